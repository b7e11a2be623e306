"""One training step: every micro-batch of one optimizer step, forward, loss, backward and
the optimizer step. The loop that schedules steps, logging, checkpoints and evaluation is
`marscale.engine.trainer`; benchmarks run this same step (`marscale.engine.measure`).

One optimizer step, on every rank::

    describe the step once: every micro-batch of every rank (`StepBatches`: ratios,
        visible and masked tokens; this rank's from the ratios its loader carried, under a
        token budget), its totals and each micro-batch's loss weights
    for each micro-batch:
        video  -> device (already there from the trainer's `DevicePrefetcher`, augmented
                  there with data.augment_on "device") -> normalise -> mixup/cutmix (soft
                  targets) -> precision
        tokens <- the micro-batch's mask (generator seeded by (seed, step, micro, rank),
                  host, cheap) in the one packed layout, moved to the device once
        loss   = soft-target CE + recon_weight x masked MSE (MAR) | CE (ViT), the
                 reconstruction target built from the clip the model saw; weighted by the
                 whole step's clips and masked tokens (`StepBatches.scales`: 1.0 each when
                 every micro-batch is alike)
        engine.backward(loss); engine.step()   (DeepSpeed steps at the accumulation boundary)

The step returns loss tensors (no host sync); the loop sums them on the device and reads
them on logging steps. A benchmark may pass a `PhaseClock` (`marscale.engine.phases`),
which times each phase with a device sync at every boundary; the trainer passes none, and
the step's marks then do nothing (no sync).
"""

from __future__ import annotations

import dataclasses

import torch

from marscale.data.mixup import build_mixup, normalize
from marscale.engine.build import Engine
from marscale.engine.config import TrainConfig
from marscale.engine.loss import build_loss
from marscale.engine.phases import NoClock, PhaseClock
from marscale.engine.plan import RunPlan
from marscale.tokens.batches import StepBatches
from marscale.tokens.packing import PackedTokens


@dataclasses.dataclass
class StepOutput:
    losses: list[dict[str, torch.Tensor]]
    """Per micro-batch: detached {"loss", "loss_cls", "loss_recon"?}; the last also
    "grad_norm" when asked for."""
    batches: StepBatches
    """What the step held (the metrics count its work)."""


class TrainStep:
    """Runs optimizer steps of `cfg` on a built engine (`marscale.engine.build`)."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, built: Engine, *, rank: int, world_size: int,
                 phases: PhaseClock | None = None):
        self.phases = phases or NoClock()
        self.engine, self.device, self.dtype = built.engine, built.device, built.dtype
        self.own_grad_norm = built.own_grad_norm
        self.batches = plan.batches
        self.rank, self.world_size = rank, world_size
        self.clip = cfg.clip
        self.mixup = build_mixup(cfg.data, cfg.model.num_classes)
        self.loss = build_loss(cfg.clip, cfg.model.patch_size, cfg.optim.recon_weight)

    def describe(self, step: int, micro_batches: list[dict]) -> StepBatches:
        """Every micro-batch of `step` on every rank, this rank's from the ratios its loader
        carried (token budgets), the others' drawn."""
        mine = None
        if "ratios" in micro_batches[0]:
            mine = [self.batches.describe(batch["ratios"].tolist()) for batch in micro_batches]
        return self.batches.step_batches(step, self.world_size, self.rank, mine)

    def __call__(self, step: int, micro_batches: list[dict], *, want_grad_norm: bool = False) -> StepOutput:
        """Optimizer step `step` over this rank's `micro_batches` ("video" uint8 [B, C, T,
        H, W] augmented clips and "label" int64 [B], on the device or the host)."""
        self.phases.start()
        layout = self.describe(step, micro_batches)
        losses = []
        for micro, batch in enumerate(micro_batches):
            tokens = self.batches.tokens(layout.by_rank[self.rank][micro], step, micro, self.rank)
            if tokens is not None:
                tokens = tokens.to(self.device, non_blocking=True)
            self.phases.mark("masks")
            losses.append(self.micro_step(
                batch, tokens, layout.scales(self.rank, micro), want_grad_norm=want_grad_norm,
            ))
        return StepOutput(losses, layout)

    def micro_step(
        self, batch: dict, tokens: PackedTokens | None, scales: tuple[float, float], *, want_grad_norm: bool = False
    ) -> dict[str, torch.Tensor]:
        """Forward, backward and (at the accumulation boundary) the optimizer step of one
        micro-batch. scales: its (classification, reconstruction) share of the step."""
        video = batch["video"].to(self.device, non_blocking=True)  # a no-op for the prefetcher's batches
        labels = batch["label"].to(self.device, non_blocking=True)
        x = normalize(video, self.clip.mean, self.clip.std)  # fp32 [B, C, T, H, W]
        x, target = self.mixup(x, labels)  # soft targets [B, K]
        x = x.to(self.dtype)  # the clip the model sees, and the loss builds its target from
        self.phases.mark("data")
        outputs = self.engine(x, tokens)
        parts = self.loss(outputs, x, tokens, target, cls_scale=scales[0], recon_scale=scales[1])
        self.phases.mark("forward")
        self.engine.backward(parts["loss"])
        self.phases.mark("backward")
        result = {k: v.detach() for k, v in parts.items()}
        boundary = self.engine.is_gradient_accumulation_boundary()
        if want_grad_norm and boundary and self.own_grad_norm:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            result["grad_norm"] = torch.nn.utils.get_total_norm(grads)  # before step() clears them
        self.engine.step()
        if want_grad_norm and boundary and not self.own_grad_norm:
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                result["grad_norm"] = torch.as_tensor(norm)
        self.phases.mark("optimizer")
        return result
