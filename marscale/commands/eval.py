"""`marscale eval`: evaluate weights on the config's evaluation shards (multi-view, exact across ranks).

    marscale eval --checkpoint model.pt|RUN/checkpoints/step-N|RUN [--config ...] [--set ...] [--out eval.json]

Without DeepSpeed: the weights are consolidated (or read) first, so a wrong checkpoint
fails before any process group exists. Runs as a plain process or one rank of a job.
"""

from __future__ import annotations

import argparse
import json
import os

from marscale.commands.common import add_config_arguments, prepare_device
from marscale.io import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, required=False,
        help_text="YAML config (file or preset name); default: the config stored in the checkpoint",
    )
    parser.add_argument(
        "--checkpoint", required=True,
        help="exported weights (.pt from `marscale export`, or any layout load_pretrained reads) or a "
        "DeepSpeed checkpoint folder (step-N, or a run folder: its newest complete checkpoint)",
    )
    parser.add_argument("--out", default=None, help="also write the result as JSON here")


def _eval_config(args: argparse.Namespace, stored: dict | None):
    """The config of `--config` (+ overrides), or the one stored in the checkpoint."""
    from marscale.config import apply_overrides, from_dict
    from marscale.engine.config import TrainConfig, load_train_config

    if args.config:
        return load_train_config(args.config, args.overrides)
    if not stored:
        raise ValueError(f"{args.checkpoint} stores no config: pass --config")
    return from_dict(TrainConfig, apply_overrides(stored, args.overrides, TrainConfig))


def run(args: argparse.Namespace) -> int:
    """Evaluate weights on the config's evaluation shards, without DeepSpeed (collective)."""
    from marscale import dist
    from marscale.checkpoint import CheckpointError, load_pretrained
    from marscale.engine.config import PRECISION_DTYPES
    from marscale.engine.evaluate import evaluate
    from marscale.engine.export import consolidate, exported_config
    from marscale.engine.preflight import preflight
    from marscale.model import build_model

    state, stored = None, None
    if os.path.isdir(args.checkpoint):
        state, client = consolidate(args.checkpoint)
        stored = client.get("config")
    elif not args.config:
        # Files written by `marscale export` carry their training config; anything that is
        # no readable checkpoint is a CheckpointError naming the file (one line, exit 2).
        stored = exported_config(args.checkpoint)
    cfg = _eval_config(args, stored if isinstance(stored, dict) else None)
    # Weights first: a wrong checkpoint fails before any process group exists.
    model = build_model(cfg.model, cfg.clip)
    if state is None:
        report = load_pretrained(model, args.checkpoint, clip=cfg.clip, partial=cfg.model.pretrained_partial)
        untrained = [k for k in report.missing + report.dropped if not k.startswith("decoder.")]
        if untrained:
            # e.g. a pre-training checkpoint, or one fine-tuned on another label set
            raise CheckpointError(
                f"{args.checkpoint} has no trained classifier for this model "
                f"({cfg.model.num_classes} classes): {len(untrained)} weights would stay at their "
                f"initialisation, e.g. {untrained[:3]}; evaluate a fine-tuned checkpoint"
            )
    else:
        model.load_state_dict(state)
    prepare_device(cfg.run.device)
    dist.init_distributed()
    dist.setup_logging()
    try:
        plan = preflight(cfg, dist.get_world_size(), training=False)
        device = dist.resolve_device(cfg.run.device)
        dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        model.to(device=device, dtype=dtype).eval()

        def forward(x, visible_idx, masked_idx):
            return model(x, visible_idx, masked_idx)["logits"]

        result = evaluate(
            forward, cfg.data, cfg.clip, cfg.masking, plan.val_set, plan.token_grid, plan.num_classes,
            device=device, dtype=dtype,
        )
        record = {"checkpoint": os.path.abspath(args.checkpoint), **result.to_dict()}
        if dist.is_main():
            print(json.dumps(record, indent=1))
            if args.out:
                write_json(args.out, record)
        return 0
    finally:
        dist.destroy()
