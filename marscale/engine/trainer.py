"""The training loop: a MAR model (or the ViT baseline) under DeepSpeed, fed from shards.

One optimizer step, on every rank::

    lr = lr_at(step)                        set on the engine's optimizer groups
    for each of grad_accum_steps micro-batches:
        batch  <- loader                    uint8 [B, C, T, H, W] + labels (host); with
                                            data.augment_on "device": decoded windows and
                                            their drawn parameters, augmented on the device
        ratios <- plan.batches.ratios(step, micro, rank)        host: per-clip mask ratios
        mask   <- make_mask(generator(seed, step, micro, rank))   host, cheap; packed
                                            (PackedTokens) when clips differ in visible tokens
        video  -> device -> normalise -> mixup/cutmix (soft targets) -> precision
        loss   = soft-target CE + recon_weight x masked MSE (MAR) | CE (ViT), the
                 reconstruction target built from the clip the model saw; with batches
                 that differ, weighted by the whole step's clips and masked tokens
        engine.backward(loss); engine.step()   (DeepSpeed steps at the boundary)

The step returns loss tensors; they are summed on the device and read (`.tolist()`,
the only host sync) on logging steps.

Determinism and resume: masks come from a generator seeded by (seed, step, micro,
rank), so they need no saved state; dropout / drop path draw from torch's global
generator and mixup from numpy's, whose per-rank states are saved with each checkpoint
and restored last on resume; the data stream is a function of (seed, epoch, rank) and
is resumed at its batch offset (`start_batch`). On CPU with fixed seeds an interrupted
and resumed run produces the same losses as an uninterrupted one
(tests/test_engine_trainer.py checks it).

Divergence: the losses are read on logging steps, and every checkpoint step is also a
logging step. A NaN or infinite interval loss raises `TrainingDiverged` there, before
the weights are saved, so the newest complete checkpoint is always one from before the
divergence.

Pre-emption: SIGTERM or SIGUSR1 sets a flag. At the next step boundary all ranks agree
(one all-reduce of the flag over a gloo group), save a checkpoint and return
`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), which job scripts use to requeue
(launch/slurm.sbatch). Data-loader workers start with these signals blocked
(`marscale.data.loaders.start_iterator`), so a signal sent to every process of the job
does not kill them mid-step; the loader's iterator is closed on every way out of the loop
instead, and kills what does not stop, so an error (e.g. shards that are all bad) ends
the run rather than leaving it waiting on its workers. A run that finishes returns 0.

Bad samples: the loaders skip and count them per reason; the counts since the start,
summed over the ranks, are logged on logging steps (`skipped_samples` in metrics.jsonl
and TensorBoard), in one line at the end of the loop, and in the evaluation result.

Every derived number (steps per epoch, loader batches, warm-up, FLOPs per clip) comes
from the run plan (`marscale.engine.plan`), computed once at start, logged and saved as
`plan.json` beside `config.yaml`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Iterator

import torch

from marscale.core import dist
from marscale.core.config import save_config, to_dict
from marscale.checkpoints import folders as ckpt
from marscale.engine.config import PRECISION_DTYPES, TrainConfig
from marscale.engine.evaluate import EvalResult, evaluate
from marscale.engine.metrics import IntervalTimer, LossMeter, MetricsWriter, SkipTally, StepCost, format_counts
from marscale.engine.metrics import format_record, peak_memory_bytes, peak_tflops, sum_over_ranks, throughput
from marscale.engine.plan import save_plan
from marscale.engine.preflight import preflight
from marscale.checkpoints.reshape import Layout, ReshapeError, ResumeSource, plan_resume
from marscale.checkpoints.rng_state import load_rng_state
from marscale.core.io import write_json
from marscale.engine.loss import build_loss
from marscale.tokens.masking import make_mask, mask_to_indices
from marscale.tokens.packing import PackedTokens, pack_mask
from marscale.tokens.batches import loss_scales
from marscale.core.seeding import derive_seed, seed_everything
from marscale.core.signals import StopSignal

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status after a pre-emption signal: a checkpoint of the current step was saved."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite. Raised on every rank at once (the loss
    is all-reduced), before any checkpoint of the diverged weights is written."""


CONFIG_FILE = "config.yaml"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
EVAL_FILE = "eval.json"
LOAD_REPORT_FILE = "load_report.json"
"""What `model.pretrained` filled, by part of the model (`marscale.weights.pretrained.LoadReport`)."""


class Trainer:
    """Builds the model, optimizer, DeepSpeed engine and writers for `cfg`; `fit()` trains.

    Needs the process group (`marscale.core.dist.init_distributed`). Every public method is
    collective: call it on all ranks.
    """

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        from marscale.data import build_mixup
        from marscale.data.config import resolve_augment_on
        from marscale.data.device_augment import DeviceAugment
        from marscale.data.stages import SKIP_REASONS
        from marscale.engine.ds_config import build_deepspeed_config
        from marscale.engine.optim import build_optimizer
        from marscale.model import build_model

        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.output_dir = cfg.run.output_dir
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        device = dist.resolve_device(cfg.run.device)
        # Every derived number, from the config, the world size and the manifests (read once),
        # after every check that can run before the first step (all problems in one error).
        self.plan = preflight(cfg, self.world_size)

        # Same seed on every rank for the initial weights (DeepSpeed also broadcasts them).
        seed_everything(cfg.run.seed)
        model = build_model(cfg.model, cfg.clip)
        if cfg.model.pretrained:
            from marscale.weights.pretrained import load_pretrained

            report = load_pretrained(model, cfg.model.pretrained, clip=cfg.clip, partial=cfg.model.pretrained_partial)
            if dist.is_main():
                os.makedirs(self.output_dir, exist_ok=True)
                write_json(os.path.join(self.output_dir, LOAD_REPORT_FILE), report.to_json())
        optimizer = build_optimizer(model, cfg.optim, device.type, offload=cfg.deepspeed.offload_optimizer)
        # The checkpoint to resume from, and whether DeepSpeed loads it in its universal
        # format (saved on another world size), are decided before the engine exists: the
        # format is part of DeepSpeed's config. A combination that cannot load stops here.
        self.resume_from = self._resume_source()
        self.ds_config = build_deepspeed_config(
            cfg, self.world_size, load_universal=self.resume_from is not None and self.resume_from.universal
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.device = self.engine.device if isinstance(self.engine.device, torch.device) else device
        # DeepSpeed's wrappers (ZeRO, mixed precision) report the pre-clipping gradient norm;
        # a bare torch optimizer (ZeRO-0 in fp32) does not, so the loop computes it then.
        self._own_grad_norm = isinstance(self.engine.optimizer, torch.optim.Optimizer)
        # From here on ranks draw different dropout / drop-path / mixup randomness.
        seed_everything(derive_seed(cfg.run.seed, 1, self.rank))

        self.mixup = build_mixup(cfg.data, cfg.model.num_classes)
        self.augment_on = resolve_augment_on(cfg.data.augment_on, self.device.type)
        self.device_augment = DeviceAugment(cfg.data, cfg.clip) if self.augment_on == "device" else None
        self.loss = build_loss(cfg.clip, cfg.model.patch_size, cfg.optim.recon_weight)
        self.total_steps = self.plan.total_steps
        self.cost = StepCost(
            clips_per_step=self.plan.clips_per_step,
            visible_tokens_per_clip=self.plan.visible_tokens_train,
            flops_per_clip=self.plan.flops_per_clip_train,
            world_size=self.world_size,
            peak_tflops=peak_tflops(self.device, cfg.deepspeed.precision, cfg.logging.peak_tflops),
        )
        # Batches that differ between steps or ranks (per-clip ratios, token budgets): the
        # losses are weighted by the whole step and the metrics count the work actually run.
        self._uneven = self.plan.batches.varies or cfg.data.token_budget is not None
        self.state = ckpt.TrainState()
        self.writer = MetricsWriter(self.output_dir, enabled=dist.is_main(), tensorboard=cfg.logging.tensorboard)
        self.stop = StopSignal()
        self.meter = LossMeter()
        self.skips = SkipTally(SKIP_REASONS)
        self._save_records()
        logger.info(
            "%s: %s %s, %d ranks, global batch %d, %d steps, ZeRO-%d %s, augmentation on the %s\n%s",
            cfg.run.name,
            cfg.model.arch,
            cfg.model.variant,
            self.world_size,
            self.plan.clips_per_step,
            self.plan.total_steps,
            cfg.deepspeed.zero_stage,
            cfg.deepspeed.precision,
            self.augment_on,
            self.plan.summary(),
        )

    # --- records ----------------------------------------------------------------------

    def _save_records(self) -> None:
        """The effective config (YAML), the run plan and the generated DeepSpeed config (JSON,
        records of the run)."""
        if dist.is_main():
            os.makedirs(self.output_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.output_dir, CONFIG_FILE))
            save_plan(self.plan, self.output_dir)
            with open(os.path.join(self.output_dir, DEEPSPEED_CONFIG_FILE), "w") as f:
                json.dump(self.ds_config, f, indent=1)
                f.write("\n")

    @property
    def checkpoints_root(self) -> str:
        return ckpt.checkpoints_root(self.output_dir)

    # --- one step ---------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        from marscale.engine.optim import lr_at

        o = self.cfg.optim
        return lr_at(
            step,
            schedule=o.schedule,
            base_lr=o.lr,
            min_lr=o.min_lr,
            warmup_lr=o.warmup_lr,
            warmup_steps=self.plan.warmup_steps,
            total_steps=self.plan.total_steps,
        )

    def set_lr(self, lr: float) -> None:
        from marscale.engine.optim import apply_lr

        # engine.optimizer is DeepSpeed's wrapper (ZeRO 1-3, bf16/fp16) or the torch
        # optimizer itself; each exposes the param_groups its step reads.
        apply_lr(self.engine.optimizer, lr)

    def train_masks(
        self, step: int, micro: int, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, PackedTokens | None]:
        """(visible_idx, masked_idx, None) on the device for a training micro-batch of `batch`
        clips, (None, None, None) with nothing masked, or (None, None, packed) when the clips
        draw their own ratios (`plan.batches`)."""
        batches = self.plan.batches
        ratios = batches.ratios(step, micro, self.rank)
        if len(ratios) != batch:
            raise RuntimeError(
                f"rank {self.rank}: the loader gave {batch} clips for step {step} micro-batch {micro}, "
                f"the batch plan says {len(ratios)}"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, step, micro, self.rank))
        per_clip = list(ratios) if batches.varies else None
        mask = make_mask(self.cfg.masking, batch, self.plan.token_grid, generator, train=True, ratios=per_clip)
        if mask is None:
            return None, None, None
        if batches.varies:
            return None, None, pack_mask(mask).to(self.device, non_blocking=True)
        visible_idx, masked_idx = mask_to_indices(mask)
        return visible_idx.to(self.device, non_blocking=True), masked_idx.to(self.device, non_blocking=True), None

    def train_step(
        self,
        video: torch.Tensor,
        labels: torch.Tensor,
        visible_idx: torch.Tensor | None,
        masked_idx: torch.Tensor | None,
        *,
        packed: PackedTokens | None = None,
        scales: tuple[float, float] = (1.0, 1.0),
        want_grad_norm: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Forward, backward and (at the accumulation boundary) the optimizer step.

        video: uint8 [B, C, T, H, W] (host or device); labels: int64 [B]; packed: the
        batch's packed tokens instead of the two indices; scales: this micro-batch's
        (classification, reconstruction) share of the step (`token_batches.loss_scales`).
        Returns detached loss tensors {"loss", "loss_cls", "loss_recon"?} and, when
        `want_grad_norm` and this micro-batch ends the step, "grad_norm". No host sync.
        """
        from marscale.data import normalize

        cfg = self.cfg
        video = video.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        x = normalize(video, cfg.clip.mean, cfg.clip.std)  # fp32 [B, C, T, H, W]
        x, target = self.mixup(x, labels)  # soft targets [B, K]
        x = x.to(self.dtype)  # the clip the model sees, and the loss builds its target from
        if packed is not None:
            outputs = self.engine(x, packed=packed)
            parts = self.loss(outputs, x, packed, target, cls_scale=scales[0], recon_scale=scales[1])
        else:
            outputs = self.engine(x, visible_idx, masked_idx)
            parts = self.loss(outputs, x, masked_idx, target, cls_scale=scales[0], recon_scale=scales[1])
        self.engine.backward(parts["loss"])
        result = {k: v.detach() for k, v in parts.items()}
        boundary = self.engine.is_gradient_accumulation_boundary()
        if want_grad_norm and boundary and self._own_grad_norm:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            result["grad_norm"] = torch.nn.utils.get_total_norm(grads)  # before step() clears them
        self.engine.step()
        if want_grad_norm and boundary and not self._own_grad_norm:
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                result["grad_norm"] = torch.as_tensor(norm)
        return result

    def _flops(self, ratios: list[float]) -> int:
        """Hardware FLOPs of training clips masked at `ratios`, from each clip's visible tokens."""
        by_visible, visible = self.plan.flops_by_visible, self.plan.batches.visible
        return sum(by_visible[visible[r]] for r in ratios)

    # --- the loop ---------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training batches from the current data position (`self.state`, read
        when each epoch's loader opens) on, epoch after epoch."""
        from marscale.data.loaders import train_batches

        return train_batches(
            self.cfg.data, self.cfg.clip, self.plan.train_set, num_classes=self.plan.num_classes,
            batches_per_epoch=self.plan.batches_per_epoch, rank=self.rank, world_size=self.world_size,
            position=lambda: (self.state.epoch, self.state.batch_in_epoch), tally=self.skips,
            batch_sizes=(
                functools.partial(self.plan.batches.clips_in_batch, rank=self.rank)
                if self.cfg.data.token_budget is not None else None
            ),
            augment_on=self.augment_on,
        )

    def fit(self) -> int:
        """Resume if asked, train to the end (or a pre-emption signal), evaluate, save.

        Returns 0 when training finished, EXIT_PREEMPTED after a signal (checkpoint saved).
        """
        from tqdm import tqdm

        resumed = self._load(self.resume_from)
        cfg, state = self.cfg, self.state  # after resume(), which replaces the state
        last_saved = state.step if resumed else None
        last_eval = None
        accum = cfg.deepspeed.grad_accum_steps
        timer = IntervalTimer()
        bar = tqdm(
            total=self.total_steps, initial=state.step, disable=not dist.is_main(), desc=cfg.run.name,
            dynamic_ncols=True, mininterval=2.0,
        )
        batches = self._batches()
        exit_code = 0
        try:
            while state.step < self.total_steps:
                save_now = bool(cfg.checkpoint.every_steps) and (state.step + 1) % cfg.checkpoint.every_steps == 0
                log_now = (
                    (state.step + 1) % cfg.logging.every_steps == 0 or state.step + 1 == self.total_steps or save_now
                )
                lr = self.lr_at(state.step)
                self.set_lr(lr)
                step_clips = self.cost.clips_per_step
                if self._uneven:
                    # Every rank's ratios for this step, drawn once: the loss weights and the
                    # work the metrics count both come from them (host only, no collective).
                    step_ratios = self.plan.batches.step_ratios(state.step, self.world_size)
                    step_clips, step_visible, step_masked = self.plan.batches.totals(step_ratios)
                    timer.add_work(step_clips, step_visible, self._flops(step_ratios))
                for micro in range(accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    timer.add_data_wait(time.perf_counter() - t0)
                    video = batch["video"]
                    if self.device_augment is not None:  # decoded windows + drawn parameters -> clips
                        video = self.device_augment(video.to(self.device, non_blocking=True), batch["augment"])
                    visible_idx, masked_idx, packed = self.train_masks(state.step, micro, video.shape[0])
                    scales = (1.0, 1.0)
                    if self._uneven:
                        clips, _, masked = self.plan.batches.batch_counts(state.step, micro, self.rank)
                        scales = loss_scales((clips, masked), (step_clips, step_masked), self.world_size, accum)
                    parts = self.train_step(
                        video, batch["label"], visible_idx, masked_idx, packed=packed, scales=scales,
                        want_grad_norm=log_now,
                    )
                    self.meter.add(parts)
                state.step += 1
                state.samples_seen += step_clips
                state.batch_in_epoch += accum
                if state.batch_in_epoch >= self.plan.batches_per_epoch:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                timer.steps += 1
                bar.update(1)
                if log_now:
                    values = self._log(lr, timer)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                    timer.reset()
                    self._check_finite(values)
                if self.stop.agreed():
                    logger.warning("signal %s received: saving step %d and exiting", self.stop.received, state.step)
                    if self.meter.micro_steps:  # losses not read since the last log: check them first
                        self._check_finite(self._log(lr, timer))
                    if last_saved != state.step:
                        self.save()
                    exit_code = EXIT_PREEMPTED
                    break
                if save_now:
                    self.save()
                    last_saved = state.step
                if cfg.run.eval_every_steps and state.step % cfg.run.eval_every_steps == 0:
                    self.evaluate()
                    last_eval = state.step
        finally:
            batches.close()
            bar.close()
        self._report_skips()
        if exit_code == 0:
            if cfg.checkpoint.save_at_end and last_saved != state.step:
                self.save()
            if last_eval != state.step:
                self.evaluate()
        return exit_code

    def _check_finite(self, values: dict) -> None:
        """Raise TrainingDiverged if the logged interval loss is NaN or infinite."""
        if math.isfinite(values["loss"]):
            return
        latest = ckpt.latest_checkpoint(self.checkpoints_root)
        raise TrainingDiverged(
            f"the training loss is {values['loss']} at step {self.state.step} (mean since the previous log); "
            f"stopped without saving these weights. Newest complete checkpoint: {latest or 'none'}. "
            f"Resume from it with --resume auto after lowering optim.lr, setting optim.clip_grad or "
            f"switching deepspeed.precision (fp16 -> bf16)."
        )

    def _report_skips(self) -> None:
        """Collective. The end-of-run line: samples the training loaders skipped, all ranks."""
        skipped = sum_over_ranks(self.skips.local(), self.world_size, self.device)
        level = logging.WARNING if any(skipped.values()) else logging.INFO
        logger.log(level, "samples skipped by the training loaders (all ranks): %s", format_counts(skipped))

    def _log(self, lr: float, timer: IntervalTimer) -> dict:
        """Collective. Losses averaged over the interval and the ranks, plus rates and memory,
        and the samples the loaders skipped since the start (summed over the ranks)."""
        values = self.meter.read(self.world_size)  # the host sync of this interval
        values["lr"] = lr
        if self.cfg.deepspeed.precision == "fp16":
            values["loss_scale"] = float(getattr(self.engine.optimizer, "loss_scale", float("nan")))
            values["skipped_steps"] = int(self.engine.skipped_steps)
        values["epoch"] = self.state.epoch
        values["samples"] = self.state.samples_seen
        values["skipped_samples"] = sum_over_ranks(self.skips.local(), self.world_size, self.device)
        work = tuple(timer.work) if self._uneven else None
        values.update(throughput(self.cost, timer.steps, timer.elapsed(), timer.data_seconds, work))
        values["peak_mem_gib"] = peak_memory_bytes(self.device) / 2**30
        self.writer.log("metrics", self.state.step, values)
        logger.info("step %d/%d | %s", self.state.step, self.total_steps, format_record(values))
        return values

    # --- evaluation and checkpoints ---------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Multi-view evaluation of the current weights (collective); written to eval.json
        (latest), eval.jsonl (history) and TensorBoard."""
        engine = self.engine

        def forward(x, visible_idx, masked_idx):
            return engine(x, visible_idx, masked_idx)["logits"]

        engine.eval()
        try:
            result = evaluate(
                forward,
                self.cfg.data,
                self.cfg.clip,
                self.cfg.masking,
                self.plan.val_set,
                self.plan.token_grid,
                self.plan.num_classes,
                device=self.device,
                dtype=self.dtype,
                lockstep=self.cfg.deepspeed.zero_stage == 3,
            )
        finally:
            engine.train()
        record = {"step": self.state.step, **result.to_dict()}
        if dist.is_main():
            write_json(os.path.join(self.output_dir, EVAL_FILE), record)
        self.writer.log("eval", self.state.step, result.to_dict())
        logger.info(
            "eval step %d: top1 %.2f top5 %.2f (%d/%d videos, %d views, %.1fs; skipped samples: %s)",
            self.state.step, result.top1, result.top5, result.num_videos, result.expected_videos,
            result.num_views, result.seconds, format_counts(result.skipped_samples),
        )
        return result

    def save(self) -> str:
        """Checkpoint `step-N` (collective), then keep the newest checkpoint.keep_last."""
        return ckpt.save_checkpoint(
            self.engine, self.checkpoints_root, self.state.step,
            ckpt.client_state(self.state, self.world_size, to_dict(self.cfg)),
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def _resume_source(self) -> ResumeSource | None:
        """The checkpoint `checkpoint.resume` names, checked (intact, safe, written for this
        model, falling back past damaged ones) and, when it was saved on another world size
        under ZeRO >= 1, converted to DeepSpeed's universal format. Collective."""
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.output_dir, config=to_dict(self.cfg))
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                logger.info("no complete checkpoint in %s: starting from scratch", self.checkpoints_root)
            return None
        now = Layout(world_size=self.world_size, zero_stage=self.cfg.deepspeed.zero_stage)
        return plan_resume(path, now, self.checkpoints_root, clips_per_step=self.plan.clips_per_step)

    def resume(self) -> bool:
        """Choose the checkpoint `checkpoint.resume` names now (checked again) and load it, if
        any. True if one was loaded. (`fit` loads the one chosen when the trainer was built.)"""
        source = self._resume_source()
        if source is not None and source.universal != self.ds_config["checkpoint"]["load_universal"]:
            raise ReshapeError(
                f"{source.checkpoint} was saved on {source.saved.world_size} ranks: build the trainer again to "
                f"resume it on {self.world_size} (DeepSpeed's loader is chosen when the engine is built)"
            )
        return self._load(source)

    def _load(self, source: ResumeSource | None) -> bool:
        """Load `source` into the engine and restore the training state. True if there was one."""
        if source is None:
            return False
        path = source.checkpoint
        self.state = ckpt.resume_state(
            self.engine, source.load_path, world_size=self.world_size, steps_per_epoch=self.plan.steps_per_epoch,
            grad_accum_steps=self.cfg.deepspeed.grad_accum_steps,
        )
        # Last, after anything that might draw random numbers.
        if not load_rng_state(path, self.rank):
            logger.warning("no RNG state for rank %d in %s: random streams restart", self.rank, path)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)
        return True

    def close(self) -> None:
        self.stop.close()
        self.writer.close()
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def train(cfg: TrainConfig) -> int:
    """Train `cfg` in this process (one rank of the job). Returns the exit status.

    A collective that fails because another rank is gone (its node died or dropped off the
    network: the backend reports it at once, or after `run.collective_timeout_s`) raises
    `dist.PeerLost`, logged on every surviving rank with the peer, the step and the
    checkpoint to resume from; the command exits with status `dist.EXIT_PEER_LOST` (69).
    """
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.fit()
    except Exception as e:
        lost = dist.lost_peer(e)
        if lost is None:
            raise
        step = trainer.state.step if trainer is not None else 0
        newest = ckpt.latest_checkpoint(ckpt.checkpoints_root(cfg.run.output_dir))
        error = dist.PeerLost(
            f"{lost}. Stopped at step {step}; the newest complete checkpoint is {newest or 'none'}: start the job "
            f"again on every node with --resume auto (on fewer or more nodes too)"
        )
        logger.error("%s", error)
        raise error from e
    finally:
        if trainer is not None:
            trainer.close()
