"""Time one config's training and inference step on the real engine, with synthetic tensors.

What runs is what `marscale train` runs: the engine is built by the trainer's builder
(`marscale.engine.build`: model, AdamW groups, DeepSpeed with the config's ZeRO stage,
precision and activation checkpointing), and every step is the trainer's step
(`marscale.engine.step`: normalise, mixup, masks from the run plan, loss, backward,
optimizer step). Only the data and the weights are synthetic: uint8 clips and labels of
the config's real shapes, made once, so the loader's cost is left out, and randomly
initialised weights in place of `model.pretrained` (the same shapes and work).

    timed training step   = masks + host-to-device copy + forward + loss + backward + step
    timed inference step  = normalise + forward without the decoder (evaluation mask)

The training step's phases (`marscale.engine.step.PHASES`: masks, data, forward with the
loss, backward, optimizer) are timed on the same clock by the step's own `PhaseClock`,
which on a GPU synchronises at every phase boundary (five syncs a step instead of one:
the host's launches of one phase no longer overlap the previous phase's kernels).

Each timed step ends with a device synchronisation (the training loop itself syncs only
on logging steps; a benchmark needs the time of every step). On a CPU the step is timed
in process CPU time, with wall time beside it: on a shared machine the wall time of
identical steps was seen to vary tenfold, the CPU time far less (run with one thread,
`torch.set_num_threads(1)`, so no thread spins waiting for a descheduled sibling). Peak memory is the CUDA
allocator's peak on a GPU, and the process's peak resident memory on a CPU (reset before
each config where Linux allows it, so each config gets its own peak).

The run plan comes from `make_plan` with a stand-in shard set of the schedule's video
count, so FLOPs per clip, masks and the visible-token count are the plan's.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import statistics
import time
from typing import Callable

import torch

from marscale.core import dist
from marscale.data import normalize
from marscale.data.shards import ShardSet
from marscale.engine.build import build_engine
from marscale.engine.config import TrainConfig
from marscale.engine.metrics import Peak, peak_memory_bytes, resolve_peak
from marscale.engine.plan import RunPlan, make_plan
from marscale.engine.step import PhaseClock, TrainStep
from marscale.tokens.masking import make_mask
from marscale.tokens.packing import pack_mask

SYNTHETIC_ROOT = "<synthetic>"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Measured steps of one config on one device (times in seconds, per step)."""

    device: str
    """Device name (`torch.cuda.get_device_name`, or `CPU, N threads`)."""
    batch: int
    """Clips per step (training and inference)."""
    warmup: int
    """Untimed steps before the timed ones (each mode)."""
    steps: int
    """Timed steps (each mode)."""
    train_step_s: tuple[float, ...]
    """Time of each timed training step, on the clock named by `clock`."""
    infer_step_s: tuple[float, ...]
    clock: str
    """`wall` (GPU: wall time after a device sync) or `cpu` (CPU: the process's CPU time,
    which a busy shared machine inflates far less than wall time)."""
    train_wall_s: tuple[float, ...]
    """Wall time of each timed training step (the same as train_step_s on GPU)."""
    train_phase_s: tuple[dict[str, float], ...]
    """Each timed training step by phase (`marscale.engine.step.PHASES`), on `clock`; the
    phases of a step add up to at most its time in `train_step_s`."""
    trained_params: int
    """Parameters the optimizer updates (the model's trainable ones, whole under ZeRO-3)."""
    infer_wall_s: tuple[float, ...]
    peak_memory_bytes: int
    """Peak over building, training and inference steps (see the module docstring)."""
    flops_per_train_clip: int
    """Hardware FLOPs (2 x MACs) of one training clip, from the run plan."""
    peak: Peak
    """The device's dense peak at the config's precision (no MFU when its tflops is None)."""

    @property
    def train_median_s(self) -> float:
        return statistics.median(self.train_step_s)

    @property
    def train_spread_s(self) -> float:
        """Max - min of the timed training steps."""
        return max(self.train_step_s) - min(self.train_step_s)

    @property
    def infer_median_s(self) -> float:
        return statistics.median(self.infer_step_s)

    @property
    def phase_median_s(self) -> dict[str, float]:
        """Median seconds of each phase over the timed training steps (medians: they need
        not add up to `train_median_s`)."""
        return {p: statistics.median(s[p] for s in self.train_phase_s) for p in self.train_phase_s[0]}

    @property
    def train_clips_per_s(self) -> float:
        return self.batch / self.train_median_s

    @property
    def infer_clips_per_s(self) -> float:
        return self.batch / self.infer_median_s

    @property
    def seconds_per_train_clip(self) -> float:
        return self.train_median_s / self.batch

    @property
    def seconds_per_view(self) -> float:
        return self.infer_median_s / self.batch

    @property
    def achieved_tflops(self) -> float:
        """Model FLOPs per second of training (recomputation not counted, as MFU defines it)."""
        return self.flops_per_train_clip * self.train_clips_per_s / 1e12

    @property
    def mfu(self) -> float | None:
        return self.achieved_tflops / self.peak.tflops if self.peak.tflops else None


def synthetic_plan(cfg: TrainConfig, videos: int) -> RunPlan:
    """The run plan of `cfg` on one rank, as if its training and evaluation sets held
    `videos` videos of `model.num_classes` classes (no manifest is read)."""
    classes = tuple(str(i) for i in range(cfg.model.num_classes))
    shard_set = ShardSet(root=SYNTHETIC_ROOT, shards=(SYNTHETIC_ROOT,), shard_videos=(videos,), class_names=classes)
    return make_plan(cfg, world_size=1, train_set=shard_set, val_set=shard_set)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then covers the whole process so far


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return peak_memory_bytes(device)


def measure(
    cfg: TrainConfig,
    *,
    batch: int,
    warmup: int,
    steps: int,
    videos: int,
    tick: Callable[[], None] = lambda: None,
) -> Measurement:
    """Build `cfg`'s engine with `batch` clips per step, run `warmup` + `steps` training
    steps and as many inference steps, and time the last `steps` of each.

    Needs the process group (`marscale.core.dist.init_distributed`). `videos`: the schedule's
    training videos (only the plan's epoch arithmetic reads it). `tick` is called after
    every step (a progress bar).
    """
    # Every synthetic clip is its own video (repeated augmentation changes no step's work),
    # and an odd batch (batch 1 for the large models on a CPU) cannot pair clips for
    # mixup/cutmix, which then stay off: they blend inputs, no work for the model.
    pairs = {} if batch % 2 == 0 else {"mixup": 0.0, "cutmix": 0.0}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch, clips_per_video=1, **pairs))
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, grad_accum_steps=1))
    # Random weights: the presets start from pre-trained files that a step's work does not
    # depend on (same shapes, same kernels), and a benchmark should not need them.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=""))
    plan = synthetic_plan(cfg, videos)
    device = dist.resolve_device(cfg.run.device)
    gc.collect()  # an engine holds reference cycles: free the previous config's before this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _reset_peak_memory(device)
    built = build_engine(cfg, world_size=dist.get_world_size(), rank=dist.get_rank())
    try:
        device = built.device
        phases = PhaseClock(device, time.process_time if device.type == "cpu" else time.perf_counter)
        train_step = TrainStep(cfg, plan, built, rank=dist.get_rank(), world_size=dist.get_world_size(),
                               phases=phases)
        # ZeRO-3 leaves each rank a shard of a parameter (`ds_numel` is the whole one).
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in built.engine.module.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(cfg.run.seed)
        c = cfg.clip
        video = torch.randint(0, 256, (batch, 3, c.num_frames, c.img_size, c.img_size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)

        times = {"train": ([], []), "infer": ([], [])}  # mode -> (clock, wall)
        train_phases = []

        def timed(mode: str, step: int, fn: Callable[[], None]) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if step >= warmup:
                times[mode][0].append(time.process_time() - c0 if device.type == "cpu" else time.perf_counter() - t0)
                times[mode][1].append(time.perf_counter() - t0)
            tick()

        for step in range(warmup + steps):
            timed("train", step, lambda: train_step(step, [{"video": video, "label": labels}]))
            split = phases.take()
            if step >= warmup:
                train_phases.append(split)

        mask = make_mask(cfg.masking, batch, plan.token_grid, None, train=False)
        eval_tokens = pack_mask(mask).to(device) if mask is not None else None
        engine = built.engine
        engine.eval()

        def infer_step() -> None:
            x = normalize(video.to(device, non_blocking=True), c.mean, c.std, built.dtype)
            engine(x, eval_tokens)

        with torch.no_grad():
            for step in range(warmup + steps):
                timed("infer", step, infer_step)
        peak = _peak_memory(device)
    finally:
        built.close()
    return Measurement(
        device=device_name(device),
        batch=batch,
        warmup=warmup,
        steps=steps,
        train_step_s=tuple(times["train"][0]),
        infer_step_s=tuple(times["infer"][0]),
        clock="cpu" if device.type == "cpu" else "wall",
        train_wall_s=tuple(times["train"][1]),
        train_phase_s=tuple(train_phases),
        trained_params=trained,
        infer_wall_s=tuple(times["infer"][1]),
        peak_memory_bytes=peak,
        flops_per_train_clip=plan.flops_per_clip_train,
        peak=resolve_peak(device, cfg.deepspeed.precision, cfg.logging.peak_tflops),
    )
