"""`marscale train` / `eval` as two CPU ranks (gloo) under the launch scripts.

(Two ranks matching one rank step for step is tests/test_distributed.py.)

- `marscale train` under launch/deepspeed.sh with ZeRO-3: completes, evaluates every
  video exactly once across ranks, checkpoints from both ranks; the export of that
  checkpoint evaluated by `marscale eval` under torchrun gives the same accuracy.
- SIGTERM to a torchrun job (every process, loader workers included) saves a complete
  checkpoint and stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import DEMO_CONFIG as CONFIG
from helpers import REPO, run_overrides, subprocess_env

from marscale.core.dist import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def tiny_overrides(shards: dict[str, str], out: str) -> list[str]:
    return run_overrides(shards, out) + [
        "data.clips_per_video=1",
        "data.num_workers=1",
        "data.eval_batch_size=3",
        "data.test_num_clips=2",
        "data.test_num_crops=1",
        "logging.every_steps=1",
        "checkpoint.keep_last=0",
    ]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start_and_wait_for_steps(cmd: list[str], e: dict[str, str], metrics: str, steps: int, **popen) -> subprocess.Popen:
    """Start `cmd` and return once `metrics` holds `steps` records (the job is mid-run)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    return proc


# --- the CLI under the launchers --------------------------------------------------------


def test_train_zero3_deepspeed_launcher_then_eval_under_torchrun(synthetic_shards, tmp_path):
    out = str(tmp_path / "run")
    overrides = tiny_overrides(synthetic_shards, out) + [
        "data.batch_size=2", "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "run.max_steps=3",
        "run.eval_every_steps=2", "checkpoint.every_steps=2", "model.grad_checkpointing=2",
    ]
    cmd = ["bash", "launch/deepspeed.sh", CONFIG]
    for o in overrides:
        cmd += ["--set", o]
    e = subprocess_env()
    e.update(GPUS="2", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]

    history = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    assert [r["step"] for r in history] == [2, 3]
    for r in history:  # 8 videos x 2 views, each scored once over the two ranks
        assert r["num_videos"] == r["expected_videos"] == 8
        assert r["num_views"] == 16 and r["incomplete_videos"] == 0
    final = json.load(open(os.path.join(out, "eval.json")))
    assert final == {"step": 3, **{k: v for k, v in history[-1].items() if k != "step"}}
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    for step in (2, 3):
        ckpt_dir = os.path.join(out, "checkpoints", f"step-{step}")
        files = os.listdir(ckpt_dir)
        assert "COMPLETE" in files and {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= set(files)
        assert sum("optim_states" in f for f in files) == 2  # one ZeRO shard per rank

    from marscale.weights.export import export

    model_file = str(tmp_path / "model.pt")
    export(os.path.join(out, "checkpoints", "step-3"), model_file)
    result_file = str(tmp_path / "eval_torchrun.json")
    run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "marscale.cli", "eval",
         "--checkpoint", model_file, "--out", result_file],
    )
    standalone = json.load(open(result_file))
    for key in ("top1", "top5", "num_videos", "num_views", "incomplete_videos"):
        assert standalone[key] == final[key], (key, standalone, final)


def test_sigterm_to_torchrun_job_saves_and_stops(synthetic_shards, tmp_path):
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/torchrun.sh", CONFIG]
    for o in tiny_overrides(synthetic_shards, out) + ["data.batch_size=2", "run.max_steps=200"]:
        cmd += ["--set", o]
    e = subprocess_env()
    e.update(GPUS="2", MASTER_PORT=str(free_port()))
    metrics = os.path.join(out, "metrics.jsonl")
    proc = start_and_wait_for_steps(cmd, e, metrics, steps=2, start_new_session=True)
    # What a cluster does on pre-emption: SIGTERM to every process of the job.
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    root = os.path.join(out, "checkpoints")
    complete = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "COMPLETE"))]
    assert len(complete) == 1, log[-5000:]
    step = int(complete[0].split("-")[1])
    assert 2 <= step < 200
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= set(os.listdir(os.path.join(root, complete[0])))
    assert f"saving step {step} and exiting" in log
    last = [json.loads(line)["step"] for line in open(metrics)][-1]
    assert last == step  # stopped at the step boundary it saved



FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: one task with the variables srun sets, options dropped.
while [[ $1 == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: the two calls launch/slurm.sbatch makes.
if [[ $1 == show && $2 == hostnames ]]; then echo 127.0.0.1; fi
if [[ $1 == requeue ]]; then echo "$2" >> "$REQUEUE_LOG"; fi
"""


def test_slurm_script_requeues_after_usr1_and_the_requeued_job_resumes(synthetic_shards, tmp_path):
    """launch/slurm.sbatch run by bash with srun/scontrol stand-ins: USR1 to the batch
    shell (SLURM's `--signal=B:USR1@120`) reaches the training process, which saves and
    exits 75; the script requeues the job; the requeued job resumes and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/slurm.sbatch", CONFIG]
    for o in tiny_overrides(synthetic_shards, out) + ["data.batch_size=2", "run.max_steps=60", "data.num_workers=0"]:
        cmd += ["--set", o]
    e = subprocess_env()
    e.update(
        PATH=str(bin_dir) + os.pathsep + e["PATH"], SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="1", REQUEUE_LOG=str(tmp_path / "requeued"), MASTER_PORT=str(free_port()),
    )
    metrics = os.path.join(out, "metrics.jsonl")
    proc = start_and_wait_for_steps(cmd, e, metrics, steps=2)
    proc.send_signal(signal.SIGUSR1)  # to the batch shell only
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log[-5000:]
    assert "requeueing 4242" in log
    assert open(tmp_path / "requeued").read().split() == ["4242"]
    steps = [json.loads(line)["step"] for line in open(metrics)]
    stopped = steps[-1]
    assert 2 <= stopped < 60
    assert os.path.isfile(os.path.join(out, "checkpoints", f"step-{stopped}", "COMPLETE"))

    # The requeued job: the same script, resumed from that checkpoint.
    e["MASTER_PORT"] = str(free_port())
    second = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps == list(range(1, 61)), steps
    assert open(tmp_path / "requeued").read().split() == ["4242"]  # not requeued again
    assert json.load(open(os.path.join(out, "eval.json")))["step"] == 60


def test_two_nodes_without_ssh(synthetic_shards, tmp_path):
    """launch/deepspeed.sh with NO_SSH: the same command on two "nodes" (two host names
    of this machine in the hostfile, one slot each) forms one job of two ranks."""
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/deepspeed.sh", CONFIG]
    for o in tiny_overrides(synthetic_shards, out) + ["data.batch_size=2", "run.max_steps=3", "data.num_workers=0"]:
        cmd += ["--set", o]
    port = str(free_port())
    procs = []
    for node_rank in (1, 0):
        e = subprocess_env()
        e.update(NO_SSH="1", HOSTFILE=str(hostfile), NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    assert "mar vit_tiny, 2 ranks, global batch 4" in logs[1]  # node 0 runs rank 0
    step = os.path.join(out, "checkpoints", "step-3")
    assert {"COMPLETE", "rng_state_rank0.pt", "rng_state_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(step))
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["num_videos"] == result["expected_videos"] and result["incomplete_videos"] == 0
