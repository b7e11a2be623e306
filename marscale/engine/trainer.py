"""The training loop: a MAR model (or the ViT baseline) under DeepSpeed, fed from shards.

The trainer keeps the run: its plan, records, resume, the loop (learning rate, logging,
checkpoint and evaluation timing, stop signals) and what happens when a peer is lost. The
engine is built by `marscale.engine.build`; one optimizer step is `marscale.engine.step`.

The step's losses are summed on the device and read (`.tolist()`, the only host sync) on
logging steps. A step's micro-batches are taken from the loader before it runs, through a
`DevicePrefetcher` (`marscale.data.prefetch`): each batch reaches the step on the device,
augmented there with data.augment_on "device", and the next one's copy and augmentation
are queued (on CUDA, on a side stream) before the step's, so they overlap it.

Determinism and resume: masks come from a generator seeded by (seed, step, micro, rank);
dropout / drop path draw from torch's global generator and mixup from numpy's, whose
per-rank states are saved with each checkpoint and restored last on resume; the data
stream is a function of (seed, epoch, rank), resumed at its batch offset. On CPU an
interrupted and resumed run gives the losses of an uninterrupted one (tested).

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

Every derived number comes from the run plan (`marscale.engine.plan`), saved as
`plan.json` beside `config.yaml`. A lost peer is `marscale.engine.run`'s concern.
"""

from __future__ import annotations

import logging
import math
import os
import time

from tqdm import tqdm

from marscale.checkpoints import folders as ckpt
from marscale.checkpoints.reshape import Layout, RankBatch, ReshapeError, ResumeSource, plan_resume, restore_group_state
from marscale.checkpoints.rng_state import load_rng_state
from marscale.core import dist
from marscale.core.config import save_config, to_dict
from marscale.core.io import write_json
from marscale.core.signals import StopSignal
from marscale.data.config import resolve_augment_on
from marscale.data.device_augment import DeviceAugment
from marscale.data.loaders import train_batches
from marscale.data.prefetch import DevicePrefetcher
from marscale.data.stages import SKIP_REASONS
from marscale.engine.build import build_engine
from marscale.engine.config import TrainConfig
from marscale.engine.evaluate import EvalResult, evaluate
from marscale.engine.metrics import IntervalTimer, LossMeter, MetricsWriter, SkipTally, StepCost, format_counts
from marscale.engine.metrics import format_record, peak_memory_bytes, resolve_peak, sum_over_ranks, throughput
from marscale.engine.optim import apply_lr, lr_at
from marscale.engine.plan import save_plan
from marscale.engine.preflight import preflight
from marscale.engine.resume_config import OptimizerSettings, check_resume_config, log_changes
from marscale.engine.step import TrainStep

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status after a pre-emption signal: a checkpoint of the current step was saved."""
STOP_FILE = "STOP"
"""In run.output_dir: asks a running job to save and stop (see `Trainer._stop_file`)."""
_PROCESS_START = time.time()


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
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.output_dir = cfg.run.output_dir
        # Every derived number, after every check that can run before the first step.
        self.plan = preflight(cfg, self.world_size)
        # The checkpoint to resume from, and whether DeepSpeed loads it in its universal
        # format (saved on another world size), are decided before the engine exists: the
        # format is part of DeepSpeed's config. A combination that cannot load stops here.
        self.resume_from = self._resume_source(self.plan.resume_checkpoint)
        built = build_engine(
            cfg, world_size=self.world_size, rank=self.rank,
            load_universal=self.resume_from is not None and self.resume_from.universal,
        )
        self.built, self.engine, self.device, self.ds_config = built, built.engine, built.device, built.ds_config
        self.step = TrainStep(cfg, self.plan, built, rank=self.rank, world_size=self.world_size)
        self.augment_on = resolve_augment_on(cfg.data.augment_on, self.device.type)
        self.device_augment = DeviceAugment(cfg.data, cfg.clip) if self.augment_on == "device" else None
        self.total_steps = self.plan.total_steps
        peak = resolve_peak(self.device, cfg.deepspeed.precision, cfg.logging.peak_tflops)
        p = self.plan
        self.cost = StepCost(p.clips_per_step, p.visible_tokens_train, p.flops_per_clip_train, self.world_size, peak)
        self.state = ckpt.TrainState()
        self.writer = MetricsWriter(self.output_dir, enabled=dist.is_main(), tensorboard=cfg.logging.tensorboard)
        self.stop = StopSignal(stop_file=self._stop_file())
        self.meter = LossMeter()
        self.skips = SkipTally(SKIP_REASONS)
        self._save_records()
        logger.info(
            "%s: %s %s, %d ranks, global batch %d, %d steps, ZeRO-%d %s, augmentation on the %s\n%s",
            cfg.run.name, cfg.model.arch, cfg.model.variant, self.world_size, self.plan.clips_per_step,
            self.plan.total_steps, cfg.deepspeed.zero_stage, cfg.deepspeed.precision, self.augment_on,
            self.plan.summary(),
        )
        logger.info("%s", peak.describe())  # the peak every logged MFU divides by

    def _save_records(self) -> None:
        """The effective config (YAML), the run plan, the generated DeepSpeed config and the
        pre-trained load report (JSON, records of the run)."""
        if dist.is_main():
            os.makedirs(self.output_dir, exist_ok=True)
            if self.built.load_report is not None:
                write_json(os.path.join(self.output_dir, LOAD_REPORT_FILE), self.built.load_report.to_json())
            save_config(self.cfg, os.path.join(self.output_dir, CONFIG_FILE))
            save_plan(self.plan, self.output_dir)
            write_json(os.path.join(self.output_dir, DEEPSPEED_CONFIG_FILE), self.ds_config)

    def _stop_file(self) -> str:
        """RUN/STOP: its existence stops the run at the next step with a checkpoint (status
        75), as SIGUSR1 does; the launch scripts write it when they are pre-empted. One left
        by an earlier stop (older than this process) is removed, so a resume trains on."""
        path = os.path.join(self.output_dir, STOP_FILE)
        if dist.is_main() and os.path.exists(path) and os.path.getmtime(path) < _PROCESS_START:
            os.remove(path)
            logger.info("removed %s, left by the stop of an earlier start", path)
        return path

    @property
    def checkpoints_root(self) -> str:
        return ckpt.checkpoints_root(self.output_dir)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(
            step, schedule=o.schedule, base_lr=o.lr, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
            warmup_steps=self.plan.warmup_steps, total_steps=self.plan.total_steps,
        )

    def _batches(self) -> DevicePrefetcher:
        """This rank's training batches on the device, from the current data position
        (`self.state`) on, epoch after epoch, up to the last step's."""
        batches = train_batches(
            self.cfg.data, self.cfg.clip, self.plan.train_set, num_classes=self.plan.num_classes,
            batches_per_epoch=self.plan.batches_per_epoch, rank=self.rank, world_size=self.world_size,
            start=(self.state.epoch, self.state.batch_in_epoch), tally=self.skips,
            batch_ratios=(
                (lambda epoch, k: self.plan.batch_ratios(epoch, k, self.rank))
                if self.cfg.data.token_budget is not None else None
            ),
            augment_on=self.augment_on,
        )
        left = (self.total_steps - self.state.step) * self.cfg.deepspeed.grad_accum_steps
        return DevicePrefetcher(batches, self.device, self.device_augment, limit=left)

    def fit(self) -> int:
        """Resume if asked, train to the end (or a pre-emption signal), evaluate, save.

        Returns 0 when training finished, EXIT_PREEMPTED after a signal (checkpoint saved).
        """
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
                # engine.optimizer: DeepSpeed's wrapper (ZeRO 1-3, bf16/fp16) or the torch
                # optimizer itself; each exposes the param_groups its step reads.
                apply_lr(self.engine.optimizer, lr)
                t0 = time.perf_counter()
                micro_batches = [next(batches) for _ in range(accum)]
                timer.add_data_wait(time.perf_counter() - t0)
                out = self.step(state.step, micro_batches, want_grad_norm=log_now)
                for parts in out.losses:
                    self.meter.add(parts)
                timer.add_work(*out.batches.work(self.plan.flops_by_visible))
                state.step += 1
                state.samples_seen += out.batches.totals[0]
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
                    why = self.stop.received if isinstance(self.stop.received, str) else f"signal {self.stop.received}"
                    logger.warning("stop requested (%s): saving step %d and exiting", why, state.step)
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
            f"Resume from it with --resume auto after lowering optim.lr or setting optim.clip_grad; another "
            f"deepspeed.precision (fp16 -> bf16) needs a new run from its weights (marscale export, then "
            f"model.pretrained=...)."
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
        values.update(throughput(self.cost, timer.steps, timer.elapsed(), timer.data_seconds, tuple(timer.work)))
        values["peak_mem_gib"] = peak_memory_bytes(self.device) / 2**30
        self.writer.log("metrics", self.state.step, values)
        logger.info("step %d/%d | %s", self.state.step, self.total_steps, format_record(values))
        return values

    def evaluate(self) -> EvalResult:
        """Multi-view evaluation of the current weights (collective); written to eval.json
        (latest), eval.jsonl (history) and TensorBoard."""
        engine = self.engine

        def forward(x, tokens):
            return engine(x, tokens)["logits"]

        engine.eval()
        try:
            result = evaluate(
                forward, self.cfg.data, self.cfg.clip, self.cfg.masking, self.plan.val_set, self.plan.token_grid,
                self.plan.num_classes, device=self.device, dtype=self.built.dtype,
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
            ckpt.client_state(self.state, self.world_size, to_dict(self.cfg), self.plan.val_set.class_names),
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def _resume_source(self, path: str | None) -> ResumeSource | None:
        """`path` (an intact, safe checkpoint chosen by `ckpt.resolve_resume`), as DeepSpeed
        loads it: converted to its universal format when it was saved on another world size
        under ZeRO >= 1. Refused (one line) when a setting that cannot change on resume
        differs from the checkpoint's run; the settings that changed are logged, one line
        each (`marscale.engine.resume_config`). Collective."""
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                logger.info("no complete checkpoint in %s: starting from scratch", self.checkpoints_root)
            return None
        config = to_dict(self.cfg)
        changes = dist.decided_on_main(check_resume_config, path, config)
        now = Layout(self.world_size, self.cfg.deepspeed.zero_stage, batch=RankBatch.of_config(config))
        source = plan_resume(path, now, self.checkpoints_root)
        log_changes(path, changes)
        return source

    def resume(self) -> bool:
        """Choose the checkpoint `checkpoint.resume` names now (checked again) and load it, if
        any. True if one was loaded. (`fit` loads the one chosen when the trainer was built.)"""
        source = self._resume_source(ckpt.resolve_resume(self.cfg.checkpoint.resume, self.output_dir))
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
        configured = OptimizerSettings.of(self.engine.optimizer)  # DeepSpeed's load brings the saved ones back
        self.state = ckpt.resume_state(
            self.engine, source.load_path, steps_per_epoch=self.plan.steps_per_epoch,
            grad_accum_steps=self.cfg.deepspeed.grad_accum_steps,
        )
        if source.universal:  # DeepSpeed's ZeRO-3 universal loader shares the first group's step and settings
            restore_group_state(self.engine.optimizer, source.load_path)
        configured.apply(self.engine.optimizer)  # a changed weight decay, clip_grad, ... applies from here
        # Last, after anything that might draw random numbers.
        if not load_rng_state(path, self.rank):
            logger.warning("no RNG state for rank %d in %s: random streams restart", self.rank, path)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)
        return True

    def close(self) -> None:
        self.stop.close()
        self.writer.close()
        self.built.close()

