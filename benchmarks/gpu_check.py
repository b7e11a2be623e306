"""`make gpu-check`: the open GPU questions answered on one bare GPU machine in under 8 minutes.

Run on a machine with one CUDA GPU, the repository and no network (the Python packages
its image lacks travel as wheels, prepared beforehand where there is network):

    make gpu-wheels                      # here, with network: wheels/ (DeepSpeed, webdataset, PyAV, ...)
    make gpu-check                       # there: every step below, one JSON (runs/gpu-check/gpu_check.json)
    python3 benchmarks/gpu_check.py --dry-run    # the plan and the wheels found; runs nothing
    python3 benchmarks/gpu_check.py --smoke      # every step at tiny shapes on this CPU (make test runs it)

Steps, in order, each a child process with its own time limit inside the whole budget
(`--budget-s`, 450 s by default): a step that does not fit the time left, or needs what
the machine lacks (CUDA, a package, a kernel), is skipped with the reason printed and
recorded; one that fails or runs past its limit is recorded as such and the next one runs.
The JSON is rewritten after every step, so it holds everything measured whatever fails.

1. env: Python, torch, CUDA, the GPU, its peak (`marscale.engine.metrics.DEVICE_PEAKS`),
   the packages and decoders found.
2. attention: every backend (`marscale.model.attention`) against per_clip in fp32 on the
   same packed batch (clips at 25/50/75% of 16x224x224's 1568 tokens), forward and
   backward, bf16, head dims 64 and 80: largest error of the output and of dq/dk/dv,
   and milliseconds per forward+backward.
3. train: 20 steps of the demo in bf16 under ZeRO-2 with `data.augment_on=device`
   (RandAugment too) and per-clip mask ratios {0.25, 0.5, 0.75}, then its evaluation, on
   freshly rendered synthetic shards: losses finite, clips/s, the log's MFU and its peak.
4. device_augment: `DeviceAugment` milliseconds per batch at the K400 preset's shapes
   (16x224x224 clips from 320-pixel frames, RandAugment before the crop).
5. compare: `marscale compare` MAR ViT-L 50% against full ViT-H at 16x224x224, the same
   activation-recomputation policy for both: clips/s, TFLOP/s and MFU with the peak
   named, the measured time ratio beside the counted FLOP ratios (0.307 training, 0.232
   inference), forward/backward/optimizer split.
6. packing: `benchmarks/bench_packing.py` (packed vs padded, per backend).
7. decode: torchcodec's CUDA decoder against PyAV's frames, where torchcodec loads.

`--smoke` runs the same steps on the CPU at tiny shapes in fp32 where bf16 has no CPU
kernel (the GPU-only backends and decoders are skipped with their reason): it proves the
plumbing, not the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a plain checkout, marscale not installed

BUDGET_S = 450
"""The whole check's default budget: under 8 minutes with the machine's start-up."""
PACKAGES = ("torch", "deepspeed", "webdataset", "av", "decord", "torchcodec", "flash_attn", "triton", "timm",
            "pyyaml", "safetensors")
WHEELS = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
          "webdataset", "braceexpand", "av")
"""What a bare GPU image (PyTorch, numpy, pyyaml, timm, psutil, ninja, msgpack,
py-cpuinfo, safetensors) lacks to train: DeepSpeed and its pure-Python needs, the
WebDataset reader and PyAV (the loader's decoder and the synthetic set's encoder).
`make gpu-wheels` takes the versions installed in .venv, for the GPU image's Python."""
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64")


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    """Its own time limit on a GPU (the smoke run's is `smoke_limit_s`)."""
    smoke_limit_s: int
    run: Callable[[argparse.Namespace], dict[str, Any]]
    needs_cuda: bool = False
    """Skipped without CUDA outside --smoke (its numbers mean nothing on a CPU)."""


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def step_env(args) -> dict[str, Any]:
    """Python, torch, CUDA, the GPU and its peak, packages and decoders."""
    import torch

    from marscale.data.decode import available_decoders
    from marscale.engine.metrics import lookup_peak

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "packages": _versions(), "decoders": available_decoders(), "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count, gpus=torch.cuda.device_count(),
            peak_bf16=dataclasses.asdict(lookup_peak(props.name, "bf16")),
        )
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def _device_dtype(args):
    import torch

    if args.smoke:
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def step_attention(args) -> dict[str, Any]:
    """Every backend against per_clip in fp32, on one packed batch of three lengths."""
    import torch

    from marscale.model.attention import PackedAttention, resolve_backend
    from marscale.tokens.masking import cell_running_mask
    from marscale.tokens.packing import pack_mask

    device, dtype = _device_dtype(args)
    if args.smoke:
        grid, heads, ratios = (2, 4, 4), 2, [0.25, 0.5, 0.75]
    else:  # 16x224x224 clips (8 x 14 x 14 tokens), ViT-L's 16 heads
        grid, heads, ratios = (8, 14, 14), 16, [0.25, 0.5, 0.5, 0.75] * 2
    g = torch.Generator().manual_seed(0)
    packed = pack_mask(cell_running_mask(len(ratios), grid, ratios, g).to(device))
    rows = []
    for head_dim in (64, 80):
        q, k, v = (torch.randn(packed.total, heads, head_dim, generator=g).to(device) for _ in range(3))
        grad_out = torch.randn(packed.total, heads, head_dim, generator=g).to(device)
        ref = _attend(PackedAttention("per_clip", device), q, k, v, grad_out, packed, torch.float32, backward=True)
        for backend in ("flash_varlen", "torch_varlen", "flex", "sdpa_mask", "per_clip"):
            row: dict[str, Any] = {
                "backend": backend, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                "tokens": packed.total, "clips": packed.batch, "lengths": sorted(set(packed.lengths)),
            }
            try:
                resolve_backend(backend, device)
            except RuntimeError as e:
                rows.append({**row, "status": "skipped", "reason": str(e)})
                continue
            backward = not (backend == "flex" and device.type == "cpu")  # FlexAttention: no CPU backward
            try:
                got = _attend(PackedAttention(backend, device), q, k, v, grad_out, packed, dtype, backward=backward)
            except Exception as e:  # a kernel that fails here is the answer, not the end of the check
                rows.append({**row, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            errors = {name: float((got[name].float() - ref[name]).abs().max()) for name in got if name != "ms"}
            relative = {name: errors[name] / max(float(ref[name].abs().max()), 1e-12) for name in errors}
            agrees = max(relative.values()) <= AGREE[str(dtype).removeprefix("torch.")]
            timed = "forward+backward" if backward else "forward"
            rows.append({**row, "status": "ok" if agrees else "failed", "backward": backward, "max_abs_error": errors,
                         "max_rel_error": relative, "agrees": agrees, "ms": got["ms"], "timed": timed})
            print(f"  {backend:12s} d={head_dim}: largest error / largest value {max(relative.values()):.2e}"
                  f"{'' if agrees else ' (DISAGREES)'}, {got['ms']:.2f} ms per {timed}")
    failed = [f"{r['backend']} d={r['head_dim']}" for r in rows if r["status"] == "failed"]
    if failed:
        return {"status": "failed", "error": f"failed or disagreed with per_clip: {', '.join(failed)}", "rows": rows}
    return {"rows": rows}


AGREE = {"float32": 1e-5, "bfloat16": 2e-2}
"""Largest error over largest value (output, dq, dk, dv) against per_clip in fp32 for a
backend to agree: fp32's rounding, or bf16's (8 bits of mantissa, 2^-8 = 4e-3 per value,
a few of them summed)."""


def _attend(attention, q, k, v, grad_out, packed, dtype, *, backward: bool) -> dict[str, Any]:
    """Output and input gradients of `attention` in `dtype`, and its median ms per call (3 timed)."""
    import torch

    leaves = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]

    def once():
        with torch.set_grad_enabled(backward):
            out = attention(*leaves, packed)
            if backward:
                grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
                return out, grads
            return out, ()

    out, grads = once()
    times = []
    for _ in range(3):
        start = _clock(q.device)
        once()
        times.append(_clock(q.device) - start)
    result = {"out": out.detach()}
    result.update({name: g for name, g in zip(("dq", "dk", "dv"), grads)})
    result["ms"] = sorted(times)[1] * 1e3
    return result


def _clock(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _synthetic_shards(out: str, smoke: bool) -> str:
    """Render the demo's classes and shard them (`marscale-shards synth`), once per out folder."""
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "shards", "val", "manifest.json")):
        per_class = "4" if smoke else "16"
        _run([sys.executable, "-m", "shards_tools.cli", "synth", "--out", data, "--num-classes", "4",
              "--videos-per-class", per_class, "--size", "64x64", "--frames", "32", "--shards",
              "--samples-per-shard", "4"])
    return data


def _run(command: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, **kw)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}... exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    return done


def step_train(args) -> dict[str, Any]:
    """The demo for 20 steps (smoke: 2), bf16, ZeRO-2, device augmentation, per-clip ratios."""
    from marscale.engine.metrics import read_jsonl

    data = _synthetic_shards(args.out, args.smoke)
    run_dir = os.path.join(args.out, "train")
    steps = 2 if args.smoke else 20
    overrides = [
        f"data.train_shards={data}/shards/train", f"data.val_shards={data}/shards/val", f"run.output_dir={run_dir}",
        "deepspeed.precision=bf16", "deepspeed.zero_stage=2", "data.augment_on=device",
        "data.rand_augment=rand-m7-n2-mstd0.5-inc1", "masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5",
        f"run.max_steps={steps}", "logging.every_steps=1", "checkpoint.save_at_end=false", "data.batch_size=8",
        "data.num_workers=2", "data.eval_batch_size=8",
    ]
    if args.smoke:
        overrides += ["clip.num_frames=4", "clip.img_size=32", "data.short_side=32", "data.num_workers=0"]
    command = [sys.executable, "-m", "marscale.cli", "train", "--config", "demo"]
    for o in overrides:
        command += ["--set", o]
    start = time.perf_counter()
    done = _run(command)
    seconds = time.perf_counter() - start
    logged = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    losses = [row["loss"] for row in logged if "loss" in row]
    evaluation = json.load(open(os.path.join(run_dir, "eval.json"))) if os.path.isfile(
        os.path.join(run_dir, "eval.json")) else None
    last = logged[-1] if logged else {}
    return {
        "steps": len(losses), "losses": losses, "finite": all(x == x and abs(x) != float("inf") for x in losses),
        "wall_s": round(seconds, 1), "last_log": last, "eval": evaluation, "overrides": overrides,
        "log_tail": done.stderr.strip().splitlines()[-5:],
    }


def step_device_augment(args) -> dict[str, Any]:
    """DeviceAugment at the K400 preset's shapes (smoke: tiny)."""
    from benchmarks.bench_loader import measure_device_augment

    device, _ = _device_dtype(args)
    if args.smoke:
        return measure_device_augment("mar_vit_l_k400", batch=1, device=str(device), overrides=[
            "clip.num_frames=4", "clip.img_size=32", "data.short_side=40"], repeats=2)
    return measure_device_augment("mar_vit_l_k400", batch=8, device=str(device), repeats=10)


def step_compare(args) -> dict[str, Any]:
    """`marscale compare` MAR ViT-L 50% vs full ViT-H (smoke: --quick)."""
    from marscale.commands.compare import OUT_NAME

    out = os.path.join(args.out, "compare")
    command = [sys.executable, "-m", "marscale.cli", "compare", "--format", "json", "--out", out,
               "--checkpointing", "none"]
    if args.smoke:
        command += ["--quick", "--steps", "1", "--warmup", "0"]
    else:
        command += ["mar_vit_l_k400", "vit_h_k400", "--reference", "vit_h_k400", "--steps", "6", "--warmup", "2"]
    return _json_of(command, os.path.join(out, OUT_NAME + ".json"))


def _json_of(command: list[str], json_file: str) -> dict[str, Any]:
    """Run a command that writes `json_file` whatever fails (a failed row or case is in
    it, and the command exits 1): the JSON, with the exit status beside it when not 0."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if not os.path.isfile(json_file):
        raise RuntimeError(f"{' '.join(command[:4])}... exited {done.returncode} without writing {json_file}: "
                           f"{done.stderr.strip()[-1500:]}")
    with open(json_file) as f:
        result = json.load(f)
    if done.returncode:
        result = {"status": "failed", "error": f"exit {done.returncode} (its JSON holds what it measured)",
                  "stderr_tail": done.stderr.strip()[-1500:], "result": result}
    return result


def step_packing(args) -> dict[str, Any]:
    """benchmarks/bench_packing.py on the device (smoke: demo shapes, one repeat)."""
    out = os.path.join(args.out, "packing.json")
    device, _ = _device_dtype(args)
    command = [sys.executable, "benchmarks/bench_packing.py", "--device", str(device), "--json", out]
    if args.smoke:
        command += ["--shapes", "demo", "--repeats", "1", "--batch", "3"]
    else:
        command += ["--shapes", "vit_s", "--batch", "16"]
    return _json_of(command, out)


def step_decode(args) -> dict[str, Any]:
    """torchcodec's CUDA decoder against PyAV on one synthetic video."""
    import numpy as np
    import torch

    from marscale.data.decode import available_decoders, open_video

    if "torchcodec" not in available_decoders():
        return {"status": "skipped", "reason": "torchcodec is not installed"}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device for torchcodec's CUDA decoder"}
    from torchcodec.decoders import VideoDecoder

    data = _synthetic_shards(args.out, args.smoke)
    video = next(Path(data, "videos").rglob("*.mp4")).read_bytes()
    reader = open_video(video, "pyav")
    try:
        expected = reader.get_frames(list(range(reader.num_frames)))
    finally:
        reader.close()
    start = time.perf_counter()
    frames = VideoDecoder(video, device="cuda").get_frames_in_range(0, len(expected)).data  # [N, 3, H, W]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    got = frames.permute(0, 2, 3, 1).cpu().numpy()
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    return {"frames": len(expected), "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
            "seconds": round(seconds, 3)}


STEPS = (
    Step("env", 30, 60, step_env),
    # flex compiles a forward and a backward kernel per head dim on the first call (dynamic shapes)
    Step("attention", 120, 90, step_attention),
    Step("train", 120, 150, step_train),
    Step("device_augment", 40, 60, step_device_augment),
    Step("compare", 150, 150, step_compare, needs_cuda=True),
    Step("packing", 90, 90, step_packing),
    Step("decode", 30, 30, step_decode),
)
MIN_STEP_S = 15
"""A step starts only with at least this long left in the budget."""


# ------------------------------------------------------------------------ the parent


DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                  "SLURM_LOCALID")
"""Left out of the children's environment: every step is one process on one GPU, also when
the check is started inside a job step or after a process that set them (a stale
MASTER_PORT would be bound again)."""


def _wheel_site(args) -> dict[str, str]:
    """The children's environment: the repository and, when wheels/ holds packages this
    Python lacks, those installed into a folder of their own (no network, no dependencies
    resolved: the wheel set is complete by construction)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
    missing = [name for name in ("deepspeed", "webdataset", "av") if _versions_of(name) is None]
    if not wheels or not missing:
        return env
    site = os.path.join(args.out, "site")
    print(f"installing {len(wheels)} wheels from {args.wheels} into {site} ({', '.join(missing)} missing)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", site, *map(str, wheels)], check=True)
    env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
    sys.path.insert(0, site)
    return env


def _versions_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _skip_reason(step: Step, args, left_s: float, cuda: bool) -> str | None:
    if step.needs_cuda and not (cuda or args.smoke):
        return "needs a CUDA device"
    if not args.smoke and step.name not in ("env", "decode") and not cuda:
        return "needs a CUDA device (--smoke runs it on the CPU at tiny shapes)"
    if left_s < MIN_STEP_S:
        return f"does not fit: {left_s:.0f} s of the {args.budget_s} s budget left"
    return None


def run_all(args) -> dict[str, Any]:
    import torch

    os.makedirs(args.out, exist_ok=True)
    env = _wheel_site(args)
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "budget_s": args.budget_s, "steps": {}}
    out_json = os.path.join(args.out, "gpu_check.json")
    started = time.perf_counter()
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - started)
        reason = _skip_reason(step, args, left, cuda)
        if reason:
            result = {"status": "skipped", "reason": reason}
        else:
            limit = int(min(step.smoke_limit_s if args.smoke else step.limit_s, left))
            result = _child(step, args, env, limit)
        report["steps"][step.name] = result
        print(f"[{step.name}] {result['status']} ({result.get('seconds', 0):.0f} s)"
              + (f": {result.get('reason') or result.get('error')}" if result["status"] != "ok" else ""), flush=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(out_json, report)  # after every step: whatever fails later, this is kept
    print(f"wrote {out_json} ({report['seconds']:.0f} s)")
    return report


def _child(step: Step, args, env: dict[str, str], limit_s: int) -> dict[str, Any]:
    """`step` in a process of its own, ended at `limit_s`: a hang or a crashed kernel
    costs that step only."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    command = [sys.executable, __file__, "--step", step.name, "--result", result_file, "--out", args.out]
    command += ["--smoke"] if args.smoke else []
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1),
                "error": f"ran past its {limit_s} s limit", "stderr_tail": tail.strip()[-1500:]}
    finally:
        seconds = round(time.perf_counter() - start, 1)
    sys.stdout.write(done.stdout)
    try:
        with open(result_file) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = None
    finally:
        os.unlink(result_file)
    if done.returncode or result is None:
        return {"status": "failed", "seconds": seconds, "error": f"exit {done.returncode}",
                "stderr_tail": done.stderr.strip()[-1500:]}
    status = result.pop("status", "ok")
    return {"status": status, "seconds": seconds, **result}


def _write_json(path: str, obj) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def dry_run(args) -> dict[str, Any]:
    """The plan, what this machine has and which wheels are there: nothing is run."""
    import torch

    wheels = sorted(p.name for p in Path(args.wheels).glob("*.whl")) if args.wheels else []
    lacking = [name for name in WHEELS if not any(w.lower().startswith(name.lower() + "-") for w in wheels)]
    cuda = torch.cuda.is_available()
    plan = []
    total = 0
    for step in STEPS:
        limit = step.smoke_limit_s if args.smoke else step.limit_s
        reason = _skip_reason(step, args, args.budget_s, cuda)
        what = (step.run.__doc__ or "").strip().splitlines()[0]
        plan.append({"step": step.name, "limit_s": limit, "skip": reason, "what": what})
        total += 0 if reason else limit
        print(f"  {step.name:15s} {limit:4d} s  {('skipped: ' + reason) if reason else what}")
    print(f"budget {args.budget_s} s (step limits add up to {total} s; a step starts only with {MIN_STEP_S} s left)")
    print(f"wheels in {args.wheels}: {len(wheels)}" + (f"; none for {', '.join(lacking)}" if lacking else ""))
    return {"plan": plan, "budget_s": args.budget_s, "wheels": wheels, "wheels_lacking": lacking, "cuda": cuda}


def prepare_wheels(out: str) -> list[str]:
    """Download (or, for DeepSpeed's source release, build) the wheels of `WHEELS` at the
    versions installed here, for the GPU image's Python (`GPU_PYTHON`, x86-64 Linux)."""
    os.makedirs(out, exist_ok=True)
    pins = {name: importlib.metadata.version(name.replace("_", "-")) for name in WHEELS}
    # One version of each package: pip refuses to install two wheels of one name, so those
    # of an earlier `make gpu-wheels` (other versions) go first.
    for old in Path(out).glob("*.whl"):
        if old.name.split("-")[0].lower() in {name.lower() for name in WHEELS}:
            old.unlink()
    binary = [f"{name}=={version}" for name, version in pins.items() if name != "deepspeed"]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", GPU_PYTHON, "--implementation", "cp", *platforms, "-d", out, *binary],
                   check=True)
    # DeepSpeed ships a source release only: its wheel is pure Python (ops are built at run
    # time), built against this torch without build isolation (which would fetch another).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
                    f"deepspeed=={pins['deepspeed']}"], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    wheels = sorted(p.name for p in Path(out).glob("*.whl"))
    size = sum(p.stat().st_size for p in Path(out).glob("*.whl"))
    print(f"{len(wheels)} wheels in {out} ({size / 2**20:.1f} MiB): {', '.join(wheels)}")
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["check", "wheels"], default="check")
    parser.add_argument("--out", default=None, help="folder (default runs/gpu-check, or wheels for `wheels`)")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S)
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="wheels to install when packages are missing")
    parser.add_argument("--smoke", action="store_true", help="every step at tiny shapes on this machine's CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the wheels found; run nothing")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run these steps only")
    parser.add_argument("--step", choices=[s.name for s in STEPS], help=argparse.SUPPRESS)  # a child's step
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: give a positive number of seconds")
    if args.command == "wheels":
        prepare_wheels(args.out or str(ROOT / "wheels"))
        return 0
    if importlib.util.find_spec("torch") is None:
        print(f"gpu_check: {sys.executable} has no PyTorch: run it with the Python that holds it (on a GPU machine "
              f"its python3; with a checkout's .venv, `make gpu-check` or .venv/bin/python)", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out or str(ROOT / "runs" / ("gpu-check-smoke" if args.smoke else "gpu-check")))
    if args.step:
        step = next(s for s in STEPS if s.name == args.step)
        _write_json(args.result, step.run(args))
        return 0
    if args.dry_run:
        dry_run(args)
        return 0
    report = run_all(args)
    failed = [name for name, r in report["steps"].items() if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
