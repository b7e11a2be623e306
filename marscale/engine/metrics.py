"""Training metrics: throughput, achieved TFLOP/s and MFU, peak memory, skipped samples,
and the writers.

Units, named apart everywhere (see `marscale.cost.counting`):
- model FLOPs per clip are *true* FLOPs (2 x multiply-accumulates), counted on the real
  modules; activation recomputation is not counted (it is not model work).
- TFLOP/s is per device: clips/s of the whole job x FLOPs per clip / devices.
- MFU = achieved TFLOP/s per device / the device's dense peak at the training precision.

Nothing here synchronises a device except `peak_memory_bytes` and what the caller does
on logging steps: the loop accumulates loss tensors and calls `.item()` only there.

Skipped samples (`marscale.data.stages.SKIP_REASONS`) are counts since the process
started (a resumed run counts from its resume), summed over the ranks on logging steps,
and recorded as one field `"skipped_samples": {reason: count}` (TensorBoard:
`<kind>/skipped_samples/<reason>`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s per device from the vendors' data sheets, by precision.
# "fp32" is plain IEEE fp32 (torch's default matmul precision), not TF32. Matched against
# torch.cuda.get_device_name() in order, so more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.5, "fp16": 989.5, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a device named `device_name` at `precision`, or None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The MFU denominator: `override` (logging.peak_tflops) if set; else the table entry
    for a CUDA device; None on CPUs and unknown devices (no MFU is reported)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device), precision)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA `max_memory_allocated`, or the peak RSS
    of the process on CPU (data-loader workers not included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Constant per-step quantities of a run, used to turn step times into rates."""

    clips_per_step: int
    """Clips per optimizer step over all ranks (the global batch)."""
    visible_tokens_per_clip: int
    """Tokens the encoder runs on per clip."""
    flops_per_clip: int
    """True model FLOPs (forward + backward) per training clip."""
    world_size: int
    peak_tflops: float | None
    """Per-device peak for MFU, or None (no MFU)."""


def throughput(
    cost: StepCost, steps: int, seconds: float, data_seconds: float, work: tuple[int, int, int] | None = None
) -> dict[str, float]:
    """Rates over an interval of `steps` optimizer steps that took `seconds` of wall time,
    `data_seconds` of which this rank waited for the loader.

    `work`: (clips, visible tokens, FLOPs) the interval actually ran over the whole job,
    when steps differ (per-clip mask ratios, token budgets); None: `steps` x the constant
    step of `cost`.

    Returns clips_per_s and visible_tokens_per_s (whole job), tflops_per_device, mfu
    (only with a peak) and data_wait (share of the interval spent waiting for data).
    """
    if steps <= 0 or seconds <= 0:
        return {}
    if work is None:
        clips = cost.clips_per_step * steps
        work = (clips, clips * cost.visible_tokens_per_clip, clips * cost.flops_per_clip)
    clips_per_s = work[0] / seconds
    tflops = work[2] / seconds / cost.world_size / 1e12
    out = {
        "clips_per_s": clips_per_s,
        "visible_tokens_per_s": work[1] / seconds,
        "tflops_per_device": tflops,
        "data_wait": min(1.0, data_seconds / seconds),
        "step_time_s": seconds / steps,
    }
    if cost.peak_tflops:
        out["mfu"] = tflops / cost.peak_tflops
    return out


class IntervalTimer:
    """Wall time and data-wait time since the last `reset` (host clock, no device sync).

    Between logging steps the host runs ahead of an accelerator; the logging step's
    `.item()` synchronises, so the interval's wall time is the device's time too.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.steps = 0
        self.work = [0, 0, 0]

    def add_work(self, clips: int, visible_tokens: int, flops: int) -> None:
        """Work of one step (whole job), when steps differ; see `throughput`."""
        self.work[0] += clips
        self.work[1] += visible_tokens
        self.work[2] += flops

    def add_data_wait(self, seconds: float) -> None:
        self.data_seconds += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class LossMeter:
    """Micro-batch losses summed on the device until a logging step reads them.

    `add` costs no host sync; `read` (collective) averages over the interval and the
    ranks and makes the one `.tolist()` of the interval, then starts a new interval.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._grad_norm: torch.Tensor | None = None
        self.micro_steps = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """parts: {"loss", "loss_cls", ...} tensors of one micro-batch, "grad_norm" optional."""
        parts = dict(parts)
        norm = parts.pop("grad_norm", None)
        if norm is not None:
            self._grad_norm = norm
        for k, v in parts.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.float().clone()
        self.micro_steps += 1

    def read(self, world_size: int) -> dict[str, float]:
        """Collective. {name: mean over the interval's micro-batches and the ranks}, with
        "grad_norm" (this rank's last) when one was given."""
        names = sorted(self._sums)
        losses = torch.stack([self._sums[k] for k in names]) / self.micro_steps
        if world_size > 1:
            torch_dist.all_reduce(losses)
            losses /= world_size
        values: dict[str, float] = dict(zip(names, losses.tolist()))
        if self._grad_norm is not None:
            values["grad_norm"] = float(self._grad_norm)
        self._sums.clear()
        self._grad_norm = None
        self.micro_steps = 0
        return values


class SkipTally:
    """Samples this rank's training loaders skipped, per reason, over the run's epochs:
    the closed loaders' counts plus the open one's (read live from its workers)."""

    def __init__(self, reasons: tuple[str, ...]) -> None:
        self._closed = dict.fromkeys(reasons, 0)
        self._open = None

    def open(self, loader) -> None:
        """Count `loader` (anything with `skipped() -> {reason: count}`) from now on."""
        self.close()
        self._open = loader

    def close(self) -> None:
        """Add the open loader's final counts to the closed ones (after its workers stopped)."""
        if self._open is not None:
            self._closed = self.local()
            self._open = None

    def local(self) -> dict[str, int]:
        """This rank's counts so far (no collective)."""
        current = self._open.skipped() if self._open is not None else {}
        return {reason: n + current.get(reason, 0) for reason, n in self._closed.items()}


def sum_over_ranks(counts: dict[str, int], world_size: int, device: torch.device) -> dict[str, int]:
    """Collective when world_size > 1: {name: count summed over the ranks}. `device` is
    one the process group's backend reduces (the rank's device)."""
    if world_size <= 1:
        return dict(counts)
    total = torch.tensor(list(counts.values()), dtype=torch.int64, device=device)
    torch_dist.all_reduce(total)
    return dict(zip(counts, total.tolist()))


def format_counts(counts: dict[str, int]) -> str:
    """`incomplete 4, decode 2`: the non-zero counts, or `none`."""
    return ", ".join(f"{name} {n}" for name, n in counts.items() if n) or "none"


class MetricsWriter:
    """Appends metric records to JSONL files and TensorBoard (main rank only).

    `log(kind, step, values)` writes one line `{"step": step, **values}` to
    `<output_dir>/<kind>.jsonl` and each number as the scalar `<kind>/<name>`. Files are
    flushed every record: a killed job keeps everything logged before it. On other
    ranks every method does nothing.
    """

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self._files: dict[str, Any] = {}
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: TensorBoard logging is off")
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        f = self._files.get(kind)
        if f is None:
            os.makedirs(self.output_dir, exist_ok=True)
            f = self._files[kind] = open(os.path.join(self.output_dir, f"{kind}.jsonl"), "a")
        f.write(json.dumps({"step": step, **values}) + "\n")
        f.flush()
        if self._tb is not None:
            for name, value in values.items():
                # One level of nesting ({"skipped_samples": {reason: n}}) becomes `kind/name/key`.
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for key, number in items:
                    if isinstance(number, (int, float)) and not isinstance(number, bool):
                        self._tb.add_scalar(f"{kind}/{name}" + (f"/{key}" if key else ""), number, step)
            self._tb.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a metrics file; a resumed run appends, so later records of a step win
    in `by_step`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Last record of each step."""
    return {r["step"]: r for r in records}


def format_record(values: dict[str, Any]) -> str:
    """One human-readable log line: `loss 1.234 | lr 1.0e-03 | clips/s 12.3 ...`. Counts
    ({name: int}, e.g. skipped samples) show their non-zero entries, or nothing when all are 0."""
    parts = []
    for name, value in values.items():
        if isinstance(value, dict):
            if not any(value.values()):
                continue
            text = format_counts(value)
        elif isinstance(value, float):
            text = f"{value:.3e}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)) else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{name} {text}")
    return " | ".join(parts)
