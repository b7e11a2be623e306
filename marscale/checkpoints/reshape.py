"""Resuming a checkpoint on another number of ranks: what is allowed, and the conversion that makes it work.

A ZeRO-1/2/3 checkpoint holds each rank's partition of the optimizer state (and, under
ZeRO-3, of the weights): DeepSpeed cannot load `step-N` written by 2 ranks into 1 or 3
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"). Its *universal* format stores every parameter whole (fp32 weight,
Adam's exp_avg and exp_avg_sq, one file each), which any number of ranks can load. The
engine owns that step, so a user only changes the number of nodes and runs `--resume auto`:

    saved on W ranks, ZeRO s     resumed on W' ranks, ZeRO s'      what happens
    any                          W' == W, s' == s                  plain load
    ZeRO-0                       W' != W, s' == 0                  plain load (weights and
                                                                   optimizer are whole on every rank)
    ZeRO-1/2/3                   W' != W, s' == s                  universal conversion, then load
    any                          s' != s                           ReshapeError before any step

The conversion (`universal_copy`) runs once, on the main rank, with DeepSpeed's
`ds_to_universal` into `RUN/checkpoints/universal/step-N.tmp-*`, renamed to
`universal/step-N` when complete and marked `COMPLETE` with the source it came from; a
resume that finds a finished conversion of the same source reuses it. The source is
checked (checksums, no code in its files) before conversion, and DeepSpeed's loads during
the conversion read weights only (`weights_only_loads`). Pruning removes a conversion
once its source checkpoint is gone (`prune_conversions`).

What changes on another world size, and is logged: the per-rank data streams (the data
order differs from the original run from there on) and, when ranks x `data.batch_size` x
`deepspeed.grad_accum_steps` (and x `data.token_budget`) differs from the checkpoint's, the
global batch and so the number of steps per epoch (`batch_change` says so, and what keeps it).

DeepSpeed's ZeRO-3 universal loader gives every parameter group the first group's step
counter and settings; `restore_group_state` gives each its own back after the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import torch

from marscale.core import dist
from marscale.data.config import BudgetUnit
from marscale.weights.layouts import CheckpointError
from marscale.checkpoints.integrity import (
    COMPLETE_MARKER,
    load_checkpoint_file,
    read_marker,
    read_model_states,
    weights_only_loads,
)
from marscale.core.io import write_json

logger = logging.getLogger(__name__)

UNIVERSAL_SUBDIR = "universal"
"""Folder under a run's checkpoints folder holding universal conversions (`step-N` each)."""


class ReshapeError(CheckpointError):
    """The checkpoint cannot be resumed with this world size / ZeRO stage; the message says
    what to set instead. Raised before the engine is built."""


@dataclasses.dataclass(frozen=True)
class RankBatch:
    """What each rank feeds one optimizer step: `grad_accum_steps` micro-batches of
    `batch_size` clips (with `token_budget`: at most `batch_size` clips, while what they
    weigh in `budget_unit` fits in it). The global batch is ranks x this."""

    batch_size: int
    grad_accum_steps: int
    token_budget: int | None = None
    budget_unit: BudgetUnit = "visible"
    """`data.budget_unit` (a config from before it: "visible", what budgets counted then)."""

    @classmethod
    def of_config(cls, config: dict[str, Any]) -> RankBatch:
        """The rank batch of a config tree as a dict (`to_dict`, as a checkpoint stores it)."""
        data = config["data"]
        return cls(data["batch_size"], config["deepspeed"]["grad_accum_steps"], data.get("token_budget"),
                   data.get("budget_unit", "visible"))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a checkpoint was (or a run is) partitioned, and the batch each rank feeds a step."""

    world_size: int
    zero_stage: int
    batch: RankBatch | None = None
    """None where it is not known (a checkpoint without a stored config): nothing is said of the batch."""


@dataclasses.dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a run resumes from and how DeepSpeed must load it."""

    checkpoint: str
    """The complete, intact `step-N` folder that was selected (its client state is the training state)."""
    load_path: str
    """What DeepSpeed loads: `checkpoint` itself, or its universal conversion."""
    universal: bool
    """Load with DeepSpeed's `checkpoint.load_universal` (the world size changed under ZeRO >= 1)."""
    saved: Layout
    """How `checkpoint` was partitioned."""


def saved_layout(path: str) -> Layout:
    """World size (from the COMPLETE marker), ZeRO stage (from DeepSpeed's model states) and
    rank batch (from the config stored with it) of checkpoint `path`."""
    world_size = read_marker(path).get("world_size")
    states = read_model_states(path)
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if not isinstance(world_size, int):
        world_size = states.get("dp_world_size", 1)
    config = (states.get("marscale") or {}).get("config")
    try:
        batch = RankBatch.of_config(config)
    except (KeyError, TypeError):  # no config, or one from before these keys
        batch = None
    return Layout(world_size=int(world_size), zero_stage=int(stage), batch=batch)


def needs_universal(saved: Layout, now: Layout) -> bool:
    """Whether `saved` loads into `now` only through a universal conversion. Raises
    ReshapeError for a combination that cannot be resumed at all."""
    if saved.zero_stage != now.zero_stage:
        raise ReshapeError(
            f"the checkpoint was saved with ZeRO-{saved.zero_stage}, this run uses ZeRO-{now.zero_stage}: "
            f"resume it with deepspeed.zero_stage={saved.zero_stage} (the ZeRO stage cannot change on resume; "
            f"the number of ranks can)"
        )
    return saved.world_size != now.world_size and saved.zero_stage > 0


def _per_step(layout: Layout) -> dict[str, int]:
    """{"batch_size": clips, "token_budget": visible tokens (with one)} one step draws over all ranks, at most."""
    b = layout.batch
    counts = {"batch_size": b.batch_size, "token_budget": b.token_budget}
    return {k: layout.world_size * b.grad_accum_steps * v for k, v in counts.items() if v is not None}


def batch_change(saved: Layout, now: Layout) -> str | None:
    """What resuming `saved` as `now` does to the global batch, for the log; None when it
    stays the same (ranks x data.batch_size x deepspeed.grad_accum_steps, and with token
    budgets ranks x data.token_budget x deepspeed.grad_accum_steps) or the checkpoint does
    not record it."""
    if saved.batch is None or now.batch is None:
        return None
    before, after = _per_step(saved), _per_step(now)
    if before == after:
        return None

    def amount(step: dict[str, int], batch: RankBatch) -> str:
        if "token_budget" not in step:
            return f"{step['batch_size']} clips"
        unit = "visible tokens" if batch.budget_unit == "visible" else "cost-weighted tokens"
        return f"at most {step['batch_size']} clips and {step['token_budget']} {unit}"

    # Each rank's micro-batch that keeps the original step, when a whole one does.
    micro_batches = now.world_size * now.batch.grad_accum_steps
    if all(v % micro_batches == 0 for v in before.values()):
        how = f"set {' and '.join(f'data.{k}={v // micro_batches}' for k, v in before.items())} to keep it"
    else:
        how = (f"no whole data.batch_size keeps it on {now.world_size} ranks with deepspeed.grad_accum_steps="
               f"{now.batch.grad_accum_steps}")
    return (f"the global batch (ranks x data.batch_size x deepspeed.grad_accum_steps) changes from "
            f"{amount(before, saved.batch)} to {amount(after, now.batch)} per step, and with it the steps per epoch: {how}")


def conversion_path(checkpoints_root: str, checkpoint: str) -> str:
    """Where the universal conversion of `checkpoint` goes in the run writing to `checkpoints_root`."""
    return os.path.join(checkpoints_root, UNIVERSAL_SUBDIR, os.path.basename(os.path.normpath(checkpoint)))


def _source_record(checkpoint: str) -> dict[str, Any]:
    marker = read_marker(checkpoint)
    return {"source": os.path.realpath(checkpoint), "source_time": marker.get("time"), "source_step": marker.get("step")}


def _finished(dest: str, source: dict[str, Any]) -> bool:
    if not os.path.isfile(os.path.join(dest, COMPLETE_MARKER)):
        return False
    try:
        info = read_marker(dest)
    except CheckpointError:
        return False
    return all(info.get(k) == v for k, v in source.items())


def _convert(checkpoint: str, dest: str) -> str:
    """Main rank: DeepSpeed's universal conversion of `checkpoint` into `dest` (atomic rename)."""

    from deepspeed.checkpoint import ds_to_universal

    source = _source_record(checkpoint)
    if _finished(dest, source):
        logger.info("reusing the universal conversion %s of %s", dest, checkpoint)
        return dest
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    args = argparse.Namespace(
        input_folder=checkpoint, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # marscale's checkpoints are plain data parallel: DeepSpeed's universal-checkpoint
        # metadata (tensor/pipeline slicing) is absent and its defaults are the right ones.
        inject_missing_state=True,
    )
    try:
        with weights_only_loads():
            ds_to_universal.main(args)
        write_json(os.path.join(tmp, COMPLETE_MARKER), {**source, "time": time.time()})
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # ds_to_universal names its output in a `latest_universal` file beside it: marscale
        # always names the folder it loads, and a stale pointer would only mislead.
        latest = os.path.join(parent, "latest_universal")
        if os.path.isfile(latest):
            os.unlink(latest)
    logger.info("converted %s to a universal checkpoint in %.1fs: %s", checkpoint, time.perf_counter() - start, dest)
    return dest


def universal_copy(checkpoint: str, checkpoints_root: str) -> str:
    """The universal conversion of `checkpoint` under `checkpoints_root` (collective: the
    main rank converts, or reuses a finished conversion; every rank gets the path)."""
    return dist.decided_on_main(_convert, checkpoint, conversion_path(checkpoints_root, checkpoint))


def plan_resume(checkpoint: str, now: Layout, checkpoints_root: str) -> ResumeSource:
    """How to resume from `checkpoint` (an intact `step-N`) with layout `now` (collective).

    Raises ReshapeError for a combination that cannot work; converts to the universal
    format when the world size changed under ZeRO >= 1; logs what changes (the global
    batch only when it does: `batch_change`).
    """
    saved = dist.decided_on_main(saved_layout, checkpoint)
    universal = needs_universal(saved, now)
    if saved.world_size != now.world_size:
        batch = batch_change(saved, now)
        logger.warning(
            "resuming %s, written by %d ranks, on %d ranks (ZeRO-%d%s): weights and optimizer state are "
            "restored whole; each rank's data stream is another one, so the data order differs from the "
            "original run from here on%s",
            checkpoint, saved.world_size, now.world_size, now.zero_stage,
            ", through a universal checkpoint" if universal else "", f"; {batch}" if batch else "",
        )
    load_path = universal_copy(checkpoint, checkpoints_root) if universal else checkpoint
    return ResumeSource(checkpoint=checkpoint, load_path=load_path, universal=universal, saved=saved)


def restore_group_state(optimizer, load_path: str) -> None:
    """Give each parameter group of `optimizer` (a DeepSpeed ZeRO optimizer just loaded from
    the universal checkpoint `load_path`) its own step counter and the settings saved with
    that group.

    DeepSpeed's ZeRO-3 universal loader (`DeepSpeedZeroOptimizer_Stage3.
    load_hp_checkpoint_state_from_checkpoint_dir_stage3`) leaves two things shared that
    belong to each group:
    - Adam's step: it puts one tensor, the first saved group's `step`, in the state of every
      ZeRO-3 sub-group. ZeRO-3 steps its sub-groups one at a time and AdamW adds 1 to `step`
      in place, so at the first update sub-group k already counts step + k + 1, the count
      runs ahead by the number of sub-groups at each update, and the bias correction is that
      of a later step: a resized run leaves the run it continues from its second step on
      (the first step's loss, taken before any update, still matches).
    - The group settings: it copies the first saved group's (layer 0's, decayed) into every
      group, so norms, biases and tokens would be decayed and every group would train at
      layer 0's lr_scale.
    ZeRO-1/2's loader keeps both per group, so this changes nothing there: one path for every
    stage. The groups match by position: the same model and optimizer config build the same
    groups in the same order (`marscale.engine.optim.param_groups`; the model is checked on
    resume).
    """
    base = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside DeepSpeed's wrapper
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    state_file = os.path.join(load_path, "zero", "optimizer_state.pt")
    saved = load_checkpoint_file(state_file, mmap=True)["param_groups"]  # mmap: only the pickle is read
    groups = base.param_groups
    if len(saved) != len(groups):
        raise CheckpointError(
            f"{state_file} holds {len(saved)} optimizer parameter groups, this run builds {len(groups)}: "
            f"resume it with the optim.layer_decay_scope it was saved with"
        )
    for group, settings in zip(groups, saved):
        group.update({k: v for k, v in settings.items() if k != "params"})


def prune_conversions(checkpoints_root: str) -> list[str]:
    """Delete universal conversions whose source `step-N` is no longer in `checkpoints_root`,
    and unfinished ones. Returns what was deleted."""
    folder = os.path.join(checkpoints_root, UNIVERSAL_SUBDIR)
    if not os.path.isdir(folder):
        return []
    deleted = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        source = os.path.join(checkpoints_root, name.split(".tmp-")[0])
        if ".tmp-" in name or not os.path.isfile(os.path.join(source, COMPLETE_MARKER)):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
