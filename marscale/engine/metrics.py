"""Training metrics: throughput, achieved TFLOP/s and MFU, peak memory, skipped samples,
and the writers.

Units, named apart everywhere (see `marscale.cost.counting`):
- model FLOPs per clip are *true* FLOPs (2 x multiply-accumulates), counted on the real
  modules; activation recomputation is not counted (it is not model work).
- TFLOP/s is per device: clips/s of the whole job x FLOPs per clip / devices.
- MFU = achieved TFLOP/s per device / the device's dense peak at the training precision
  (`DEVICE_PEAKS`, the one peak table; the peak's name and value go with every MFU).

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
import re
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """One device model of the peak table: its dense peaks and memory bandwidth."""

    name: str
    """What MFU is printed against, e.g. `H100 SXM`."""
    pattern: str
    """Regular expression searched (ignoring case) in `torch.cuda.get_device_name()`."""
    tflops: dict[str, float]
    """Dense (no sparsity) peak TFLOP/s of one device by precision; a precision without
    tensor-core units (V100: bf16) is absent, and gets no MFU."""
    bandwidth_tbs: float
    """Memory bandwidth, TB/s (the optimizer step's cost in benchmarks/bench_model.py)."""


def _dense(tensor_16bit: float, fp32: float) -> dict[str, float]:
    """bf16 and fp16 tensor cores run at one rate. (Where a datasheet gives only the 2:4
    sparsity figure, the dense one is its half: H100 SXM 1,979 -> 989.5.)"""
    return {"bf16": tensor_16bit, "fp16": tensor_16bit, "fp32": fp32}


DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    # NVIDIA datasheets (H200, H100, A100, L40S, L40, L4, V100). "fp32" is plain IEEE fp32
    # (torch's default matmul precision), not TF32. The first pattern that matches wins:
    # the more specific form of a name comes first (NVL and PCIe before the SXM default).
    DevicePeak("H200 NVL", r"\bH200\b.*\bNVL\b", _dense(835.5, 60), 4.8),
    DevicePeak("H200 SXM", r"\bH200\b", _dense(989.5, 67), 4.8),
    DevicePeak("H100 NVL", r"\bH100\b.*\bNVL\b", _dense(835.5, 60), 3.9),
    DevicePeak("H100 PCIe", r"\bH100\b.*\bPCIe\b", _dense(756.5, 51), 2.0),
    DevicePeak("H100 SXM", r"\bH100\b", _dense(989.5, 67), 3.35),  # "NVIDIA H100 80GB HBM3"
    DevicePeak("A100 SXM4 80GB", r"\bA100\b.*\bSXM4?\b.*\b80GB\b", _dense(312.0, 19.5), 2.039),
    DevicePeak("A100 PCIe 80GB", r"\bA100\b.*\b80GB\b", _dense(312.0, 19.5), 1.935),
    DevicePeak("A100 40GB", r"\bA100\b", _dense(312.0, 19.5), 1.555),  # SXM4 and PCIe alike
    DevicePeak("L40S", r"\bL40S\b", _dense(362.05, 91.6), 0.864),
    DevicePeak("L40", r"\bL40\b", _dense(181.05, 90.5), 0.864),
    DevicePeak("L4", r"\bL4\b", _dense(121.0, 30.3), 0.3),
    DevicePeak("V100 SXM2", r"\bV100\b.*\bSXM2\b", {"fp16": 125.0, "fp32": 15.7}, 0.9),
    DevicePeak("V100 PCIe", r"\bV100\b", {"fp16": 112.0, "fp32": 14.0}, 0.9),
)
"""The one peak table: the trainer's and `marscale compare`'s MFU and
benchmarks/bench_model.py all read it (`match_device`, `lookup_peak`, `resolve_peak`)."""


def match_device(device_name: str) -> DevicePeak | None:
    """The table's row for a device named `device_name` (as CUDA names it), or None."""
    return next((d for d in DEVICE_PEAKS if re.search(d.pattern, device_name, re.IGNORECASE)), None)


@dataclasses.dataclass(frozen=True)
class Peak:
    """The MFU denominator of a run, and what it is: printed with every MFU."""

    tflops: float | None
    """Dense peak TFLOP/s of one device at the training precision; None: no MFU."""
    name: str
    """Where the peak comes from (`H100 SXM bf16 dense`, `logging.peak_tflops`), or why
    there is none (`no MFU: ...`)."""

    def describe(self) -> str:
        """`MFU against H100 SXM bf16 dense, 989.5 TFLOP/s`, or the reason there is none."""
        return f"MFU against {self.name}, {self.tflops:g} TFLOP/s" if self.tflops else self.name


def lookup_peak(device_name: str, precision: str, override: float | None = None,
                override_name: str = "logging.peak_tflops") -> Peak:
    """The peak of a CUDA device named `device_name` at `precision` (a pure function: the
    name is data); `override` (named `override_name`) wins over the table."""
    if override is not None:
        return Peak(override, f"{override_name} (set)")
    row = match_device(device_name)
    if row is None:
        return Peak(None, f"no MFU: {device_name!r} is not in the peak table (set {override_name})")
    if precision not in row.tflops:
        return Peak(None, f"no MFU: {row.name} has no dense {precision} peak (set {override_name})")
    return Peak(row.tflops[precision], f"{row.name} {precision} dense")


def resolve_peak(device: torch.device, precision: str, override: float | None,
                 override_name: str = "logging.peak_tflops") -> Peak:
    """The MFU denominator of a run on `device`: `override` (named `override_name`) if set;
    else the table's entry for a CUDA device; no MFU on a CPU or an unknown device."""
    if override is None and device.type != "cuda":
        return Peak(None, f"no MFU: {device.type} has no peak in the table (set {override_name})")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return lookup_peak(name, precision, override, override_name)


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
    peak: Peak
    """Per-device peak for MFU (no MFU when its tflops is None)."""


def throughput(
    cost: StepCost, steps: int, seconds: float, data_seconds: float, work: tuple[int, int, int] | None = None
) -> dict[str, float]:
    """Rates over an interval of `steps` optimizer steps that took `seconds` of wall time,
    `data_seconds` of which this rank waited for the loader.

    `work`: (clips, visible tokens, FLOPs) the interval actually ran over the whole job,
    when steps differ (per-clip mask ratios, token budgets); None: `steps` x the constant
    step of `cost`.

    Returns clips_per_s and visible_tokens_per_s (whole job), tflops_per_device, mfu with
    the peak it divides by (mfu_peak_tflops, and mfu_peak: its name; only with a peak) and
    data_wait (share of the interval spent waiting for data).
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
    if cost.peak.tflops:
        out.update(mfu=tflops / cost.peak.tflops, mfu_peak_tflops=cost.peak.tflops, mfu_peak=cost.peak.name)
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
