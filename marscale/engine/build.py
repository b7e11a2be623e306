"""Building the training engine of a config, in one function: `build_engine`.

    seeds (run.seed: the same initial weights on every rank)
    -> model (`marscale.model.build_model`, the attention kernel chosen for the run's device)
    -> pre-trained weights (`model.pretrained`, `marscale.weights.pretrained`)
    -> AdamW groups (`marscale.engine.optim`)
    -> DeepSpeed config (`marscale.engine.ds_config`, generated from the typed config)
    -> `deepspeed.initialize`
    -> per-rank seeds (dropout, drop path and mixup differ between ranks from here on)

The trainer and the measured comparison (`marscale.engine.measure`) both build here, so
what a benchmark times is what training runs. This is the only module that creates a
DeepSpeed engine.
"""

from __future__ import annotations

import dataclasses

import deepspeed
import torch

from marscale.core import dist
from marscale.core.seeding import derive_seed, seed_everything
from marscale.engine.config import PRECISION_DTYPES, TrainConfig
from marscale.engine.ds_config import build_deepspeed_config
from marscale.engine.optim import build_optimizer
from marscale.model import build_model
from marscale.weights.pretrained import LoadReport, load_pretrained


@dataclasses.dataclass
class Engine:
    """A built engine and what the step needs to know about it."""

    engine: deepspeed.DeepSpeedEngine
    device: torch.device
    dtype: torch.dtype
    """The precision the model computes in (deepspeed.precision)."""
    ds_config: dict
    """The generated DeepSpeed config (saved beside the run as a record)."""
    load_report: LoadReport | None
    """What `model.pretrained` filled, or None without pre-trained weights."""
    own_grad_norm: bool
    """True when the optimizer is a bare torch optimizer (ZeRO-0 in fp32), which reports no
    gradient norm: the step computes it. DeepSpeed's wrappers report the pre-clipping norm."""

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def build_engine(cfg: TrainConfig, *, world_size: int, rank: int, load_universal: bool = False) -> Engine:
    """The engine of `cfg` on this rank of `world_size`. Collective (deepspeed.initialize).

    load_universal: DeepSpeed loads the checkpoint to resume in its universal format (saved
    on another world size, `marscale.checkpoints.reshape`); part of DeepSpeed's config, so
    decided before the engine exists.
    """
    device = dist.resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, cfg.clip, compute_device=device)
    report = None
    if cfg.model.pretrained:
        report = load_pretrained(model, cfg.model.pretrained, clip=cfg.clip, partial=cfg.model.pretrained_partial)
    optimizer = build_optimizer(model, cfg.optim, device.type, offload=cfg.deepspeed.offload_optimizer)
    ds_config = build_deepspeed_config(cfg, world_size, load_universal=load_universal)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    seed_everything(derive_seed(cfg.run.seed, 1, rank))
    return Engine(
        engine=engine,
        device=engine.device if isinstance(engine.device, torch.device) else device,
        dtype=PRECISION_DTYPES[cfg.deepspeed.precision],
        ds_config=ds_config,
        load_report=report,
        own_grad_norm=isinstance(engine.optimizer, torch.optim.Optimizer),
    )
