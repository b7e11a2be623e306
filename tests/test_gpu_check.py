"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without a GPU: its dry run, its
CPU smoke mode (every step at tiny shapes: the plumbing of what a GPU machine will run),
what it records when a step fails or runs out of time, and the wheels it carries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import REPO, fresh_shell_env, load_benchmark, readme_block, shell_commands

gpu_check = load_benchmark("gpu_check")

STEP_NAMES = ["env", "attention", "train", "device_augment", "compare", "packing", "decode"]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA skips")


def check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@CPU_ONLY
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    done = check("--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[: len(STEP_NAMES)]] == STEP_NAMES
    skipped = {line.split()[0] for line in lines if "skipped: needs a CUDA device" in line}
    assert skipped == set(STEP_NAMES) - {"env", "decode"}  # without a GPU only these run outside --smoke
    assert "budget 450 s" in done.stdout
    assert "none for deepspeed, hjson, pydantic" in done.stdout  # no wheels prepared
    assert not (tmp_path / "out").exists()
    smoke = check("--dry-run", "--smoke", "--budget-s", "100")
    assert smoke.returncode == 0 and "skipped" not in smoke.stdout and "budget 100 s" in smoke.stdout


def test_bad_budget_is_refused():
    done = check("--budget-s", "0")
    assert done.returncode == 2 and "--budget-s 0: give a positive number of seconds" in done.stderr


def test_steps_run_as_one_process_whatever_the_environment_holds(tmp_path, monkeypatch):
    """A check started inside a job step, or after a process that set MASTER_PORT (the test
    suite's in-process runs do), must not join a process group or bind a stale port."""
    for name in gpu_check.DIST_VARIABLES:
        monkeypatch.setenv(name, "1")
    env = gpu_check._wheel_site(argparse.Namespace(wheels="", out=str(tmp_path)))
    assert not set(gpu_check.DIST_VARIABLES) & set(env) and env["PYTHONPATH"].startswith(REPO)


def _args(tmp_path, **kw) -> argparse.Namespace:
    return argparse.Namespace(out=str(tmp_path), smoke=True, **kw)


def test_a_step_that_fails_or_overruns_is_recorded_and_costs_only_itself(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    by_name = {s.name: s for s in gpu_check.STEPS}
    slow = gpu_check._child(by_name["attention"], _args(tmp_path), env, limit_s=1)
    assert slow["status"] == "timeout" and slow["error"] == "ran past its 1 s limit" and slow["seconds"] < 10
    (tmp_path / "packing.json").mkdir()  # bench_packing cannot write its JSON there
    failed = gpu_check._child(by_name["packing"], _args(tmp_path), env, limit_s=300)
    assert failed["status"] == "failed" and failed["error"] == "exit 1"
    assert "IsADirectoryError" in failed["stderr_tail"]


@pytest.mark.slow
@CPU_ONLY
def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    """Every step's code path at tiny shapes; GPU-only kernels and decoders are skipped
    with their reason; one JSON holds it all."""
    out = tmp_path / "smoke"
    done = check("--smoke", "--out", str(out), "--wheels", "")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.load(open(out / "gpu_check.json"))
    steps = report["steps"]
    assert list(steps) == STEP_NAMES and report["mode"] == "smoke"
    assert {name: s["status"] for name, s in steps.items()} == {
        **{name: "ok" for name in STEP_NAMES}, "decode": "skipped"}
    assert steps["env"]["torch"] == torch.__version__ and "pyav" in steps["env"]["decoders"]

    rows = {(r["backend"], r["head_dim"]): r for r in steps["attention"]["rows"]}
    assert len(rows) == 10
    for (backend, _), row in rows.items():
        if backend in ("flash_varlen", "torch_varlen"):
            assert row["status"] == "skipped" and ("CUDA" in row["reason"] or "CPU" in row["reason"])
            continue
        assert row["status"] == "ok" and row["agrees"] and row["ms"] > 0
        assert max(row["max_abs_error"].values()) < 1e-5, row  # fp32 on the CPU: the same numbers
        assert set(row["max_abs_error"]) == ({"out"} if backend == "flex" else {"out", "dq", "dk", "dv"})

    train = steps["train"]
    assert train["steps"] == 2 and train["finite"] and len(train["losses"]) == 2
    assert "deepspeed.precision=bf16" in train["overrides"] and "data.augment_on=device" in train["overrides"]
    assert train["eval"] is not None
    assert steps["device_augment"]["ms_per_batch"] > 0
    assert steps["compare"]["rows"] and steps["packing"]
    assert steps["decode"]["reason"] in ("torchcodec is not installed", "no CUDA device for torchcodec's CUDA decoder")


@pytest.mark.slow
def test_readme_commands_wheels_then_the_check(tmp_path):
    """The README's commands as written: `make gpu-wheels` (one wheel per package the GPU
    image lacks, for its Python, at the versions installed here; DeepSpeed's pure Python),
    then `make gpu-check`, which on this CPU runs what needs no GPU and skips the rest."""
    commands = shell_commands(readme_block("gpu-check"))
    assert commands == ["make gpu-wheels", "make gpu-check"]
    env = fresh_shell_env()
    stale = Path(REPO, "wheels", "webdataset-0.0.1-py3-none-any.whl")  # an earlier version's
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"")
    done = subprocess.run(commands[0].split(), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert not stale.exists()  # one version of each package
    assert done.returncode == 0, done.stderr[-2000:]
    out = Path(REPO, "wheels")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    names = {w.split("-")[0].lower() for w in wheels}
    assert names == {n.lower() for n in gpu_check.WHEELS} and len(wheels) == len(gpu_check.WHEELS)
    deepspeed = next(out.glob("deepspeed-*.whl"))
    assert deepspeed.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(deepspeed) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
    for wheel in wheels:  # abi3, cp312 or pure Python: installable on the image's Python 3.12
        tag = wheel.rsplit("-", 3)[1:3]
        assert tag[0] in ("py3", "py2.py3", "cp312") or tag[1] == "abi3", wheel
    assert sum(p.stat().st_size for p in out.glob("*.whl")) < 48 * 2**20  # with the tree, under 64 MiB

    done = subprocess.run([*commands[1].split(), f"GPU_CHECK_ARGS=--out {tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.load(open(tmp_path / "gpu_check.json"))
    if not torch.cuda.is_available():
        assert report["steps"]["env"]["status"] == "ok" and report["steps"]["env"]["packages"]["deepspeed"]
        assert report["steps"]["train"] == {"status": "skipped", "reason": gpu_check._skip_reason(
            gpu_check.STEPS[2], argparse.Namespace(smoke=False, budget_s=450), 450, cuda=False)}


def test_a_python_without_torch_is_one_line():
    """`python3 benchmarks/gpu_check.py` with a Python that has no PyTorch (-S: no site-packages)."""
    done = subprocess.run([sys.executable, "-S", "benchmarks/gpu_check.py", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gpu_check: ") and "has no PyTorch" in done.stderr and done.stderr.count("\n") == 1
