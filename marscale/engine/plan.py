"""The run plan: every number derived from the config, the world size and the shard sets,
computed once at start, frozen, logged and saved beside the run (`plan.json`).

    videos per epoch    data.samples_per_epoch, or the training manifest's video count
    clips per step      data.batch_size x world size x deepspeed.grad_accum_steps (with
                        data.token_budget: the mean of the first micro-batches' sizes;
                        data.budget_unit "cost" weighs clips by the FLOPs counted below)
    videos per step     clips per step / data.clips_per_video
    steps per epoch     videos per epoch // videos per step (optimizer steps)
    loader batches      steps per epoch x grad_accum_steps (batches per rank per epoch;
                        the loader takes exactly this many, so both count the same epoch)
    total steps         run.max_steps, else optim.epochs x steps per epoch
    warm-up steps       round(optim.warmup_epochs x steps per epoch), at most total steps
    tokens              the clip's token grid; visible tokens in training and evaluation
    FLOPs               per training clip (forward + backward) and per evaluation view,
                        counted on the real modules (`marscale.cost.counting`); with per-clip mask
                        ratios, per visible-token count (the metrics count true work) and
                        the mean over the ratio schedule
    batches             which clips and mask ratios each micro-batch holds
                        (`marscale.tokens.batches`, a function of seed, step, micro, rank);
                        loader batch k of an epoch is micro-batch k mod accumulation of
                        step epoch x steps per epoch + k // accumulation (`batch_step`)

The loaders, the trainer, the learning-rate schedule, evaluation and the metrics read
these values from the plan; none of them derives its own copy.
"""

from __future__ import annotations

import dataclasses
import math
import os

from marscale.core.clip import token_grid
from marscale.engine.config import TrainConfig
from marscale.core.io import write_json
from marscale.data.shards import ShardSet
from marscale.tokens.batches import TokenBatches, build_token_batches
from marscale.cost.counting import count_visible, training_flops_by_visible

PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Numbers of one run on one world size (see the module docstring for each rule)."""

    world_size: int
    train_set: ShardSet
    val_set: ShardSet
    num_classes: int
    """Classes the model predicts (model.num_classes; the training set has at most as many)."""
    videos_per_epoch: int
    clips_per_step: int
    """Global batch: clips per optimizer step over all ranks (with data.token_budget: the
    mean over the first micro-batches, rounded to whole videos; each step's own count is
    its `StepBatches.totals`)."""
    videos_per_step: int
    steps_per_epoch: int
    """Optimizer steps per epoch."""
    batches_per_epoch: int
    """Loader batches per rank per epoch (steps_per_epoch x grad_accum_steps)."""
    total_steps: int
    warmup_steps: int
    token_grid: tuple[int, int, int]
    tokens_per_clip: int
    visible_tokens_train: int
    visible_tokens_eval: int
    flops_per_clip_train: int
    """Hardware FLOPs (2 x MACs) of one training clip, forward + backward: the MFU numerator
    (with per-clip ratios: the mean over the ratio schedule)."""
    flops_by_visible: dict[int, int]
    """Hardware FLOPs of one training clip by its visible tokens, for every count the ratio
    schedule can draw (metrics count the work actually run from it)."""
    batches: TokenBatches
    """Clips and mask ratios of every micro-batch."""
    macs_per_view_eval: int
    """MACs (the papers' "FLOPs") of one evaluation view."""
    resume_checkpoint: str | None = None
    """The checkpoint this start resumes from (`checkpoint.resume`, checked once by the
    pre-flight); None: a fresh start (or a plan made without the pre-flight)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few lines for the start of the log."""
        t, h, w = self.token_grid
        return "\n".join(
            [
                f"run plan ({self.world_size} ranks): {self.videos_per_epoch} videos per epoch "
                f"({self.train_set.num_videos} in {self.train_set.root}), {self.clips_per_step} clips "
                f"({self.videos_per_step} videos) per step",
                f"  {self.steps_per_epoch} steps per epoch ({self.batches_per_epoch} loader batches per rank), "
                f"{self.total_steps} steps, {self.warmup_steps} warm-up",
                f"  tokens per clip {self.tokens_per_clip} ({t}x{h}x{w}), visible {self.visible_tokens_train} "
                f"in training{' (mean; per-clip ratios ' + self._ratio_text() + ')' if self.batches.varies else ''}, "
                f"{self.visible_tokens_eval} in evaluation"
                + self._budget_text(),
                f"  {self.flops_per_clip_train / 1e9:.2f} GFLOP per training clip (fwd+bwd, hardware FLOPs), "
                f"{self.macs_per_view_eval / 1e9:.2f} GMACs per evaluation view; "
                f"{self.val_set.num_videos} evaluation videos, {self.num_classes} classes",
            ]
        )


    def batch_step(self, epoch: int, batch: int) -> tuple[int, int]:
        """(optimizer step, micro-batch) of loader batch `batch` of `epoch`."""
        accum = self.batches.grad_accum_steps
        return epoch * self.steps_per_epoch + batch // accum, batch % accum

    def batch_ratios(self, epoch: int, batch: int, rank: int) -> tuple[float, ...]:
        """The mask ratios of loader batch `batch` of `epoch` on `rank`: what a loader worker
        that cuts batches by a token budget draws, and carries in the batch."""
        return self.batches.ratios(*self.batch_step(epoch, batch), rank)

    def _budget_text(self) -> str:
        b = self.batches
        if b.token_budget is None:
            return ""
        if b.budget_unit == "visible":
            return f"; batches of at most {b.token_budget} visible tokens"
        least = min(b.visible, key=lambda r: (-b.visible[r], r))
        return (f"; batches of at most {b.capacity / 1e9:.2f} GFLOP (the cost of {b.token_budget} visible tokens "
                f"of clips masked at {least:g})")

    def _ratio_text(self) -> str:
        stages = self.batches.schedule.stages
        text = ", ".join(f"from step {start}: {list(values)}" for start, values in stages)
        return text if len(stages) > 1 else str(list(stages[0][1]))


def class_problem(shard_set: ShardSet, num_classes: int) -> str | None:
    """Why the labels of `shard_set` do not fit a model of `num_classes` classes, or None.

    The manifest's class list bounds the labels the converter wrote (`marscale-shards`
    skips labels outside it); a label read past the model's classes anyway (a shard that
    disagrees with its manifest) is skipped by the loader.
    """
    if shard_set.num_classes > num_classes:
        return (
            f"{shard_set.root} has {shard_set.num_classes} classes but model.num_classes is "
            f"{num_classes}; set model.num_classes={shard_set.num_classes}"
        )
    return None


def make_plan(
    cfg: TrainConfig, world_size: int, train_set: ShardSet | None = None, val_set: ShardSet | None = None
) -> RunPlan:
    """The plan of `cfg` on `world_size` ranks. The shard sets are read from their
    manifests unless given."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    train_set = train_set if train_set is not None else ShardSet.load(cfg.data.train_shards)
    val_set = val_set if val_set is not None else ShardSet.load(cfg.data.val_shards)
    problem = class_problem(train_set, cfg.model.num_classes)
    if problem:
        raise ValueError(problem)
    videos = cfg.data.samples_per_epoch if cfg.data.samples_per_epoch is not None else train_set.num_videos
    grid = token_grid(cfg.clip, cfg.model.patch_size)
    accum = cfg.deepspeed.grad_accum_steps
    def clip_flops(visible_counts) -> dict[int, int]:
        return training_flops_by_visible(cfg.model, cfg.clip, visible_counts)

    batches = build_token_batches(
        cfg.masking, grid, seed=cfg.run.seed, batch_size=cfg.data.batch_size, token_budget=cfg.data.token_budget,
        clips_per_video=cfg.data.clips_per_video, pairs=cfg.data.mixup > 0 or cfg.data.cutmix > 0,
        grad_accum_steps=accum, budget_unit=cfg.data.budget_unit, clip_flops=clip_flops,
    )
    clips = cfg.data.batch_size * world_size * accum
    if cfg.data.token_budget is not None:
        per_video = cfg.data.clips_per_video
        clips = max(per_video, round(batches.mean_clips_per_batch() * world_size * accum / per_video) * per_video)
    videos_per_step = clips // cfg.data.clips_per_video
    steps = videos // videos_per_step
    if steps < 1:
        raise ValueError(
            f"an epoch of {videos} videos is less than one optimizer step of {videos_per_step} videos "
            f"({world_size} ranks x {cfg.data.videos_per_batch} videos x {cfg.deepspeed.grad_accum_steps} "
            f"accumulation steps); lower data.batch_size or deepspeed.grad_accum_steps, or raise "
            f"data.samples_per_epoch"
        )
    total = cfg.run.max_steps if cfg.run.max_steps is not None else cfg.optim.epochs * steps
    warmup = 0 if cfg.optim.warmup_epochs == 0 else min(int(math.floor(cfg.optim.warmup_epochs * steps + 0.5)), total)
    eval_visible = cfg.masking.visible(grid, cfg.masking.ratio_at(train=False))
    by_visible = clip_flops(batches.visible.values())  # cached: a cost budget counted these already
    visible_of = batches.visible
    mean_visible = batches.schedule.mean_over(total, lambda r: visible_of[r])
    mean_flops = batches.schedule.mean_over(total, lambda r: by_visible[visible_of[r]])
    return RunPlan(
        world_size=world_size,
        train_set=train_set,
        val_set=val_set,
        num_classes=cfg.model.num_classes,
        videos_per_epoch=videos,
        clips_per_step=clips,
        videos_per_step=videos_per_step,
        steps_per_epoch=steps,
        batches_per_epoch=steps * accum,
        total_steps=total,
        warmup_steps=warmup,
        token_grid=grid,
        tokens_per_clip=batches.tokens_per_clip,
        visible_tokens_train=round(mean_visible),
        visible_tokens_eval=eval_visible,
        flops_per_clip_train=round(mean_flops),
        macs_per_view_eval=count_visible(cfg.model, cfg.clip, eval_visible).macs_inference,
        flops_by_visible=by_visible,
        batches=batches,
    )


def save_plan(plan: RunPlan, run_dir: str) -> str:
    """Write `run_dir/plan.json` (a record of the run; never read back as a source)."""
    path = os.path.join(run_dir, PLAN_FILE)
    write_json(path, plan.to_dict())
    return path
