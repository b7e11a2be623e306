"""`marscale train | eval | export`: parse, build the config, run one job, exit.

    marscale train  --config configs/demo.yaml [--set key=value ...] [--resume auto|PATH]
    marscale eval   --checkpoint model.pt|RUN/checkpoints/step-N [--config ...] [--set ...] [--out eval.json]
    marscale export --checkpoint RUN/checkpoints/step-N|RUN --out model.pt

`train` and `eval` run as one plain process or as one rank of a launched job
(deepspeed, torchrun, srun; see launch/). Exit status of `train`: 0 finished,
75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after saving a checkpoint: run it again
with `--resume auto` to continue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    if name in ("train", "eval"):
        parser.add_argument(
            "--config", required=name == "train", help="YAML config (configs/*.yaml); eval: default is the "
            "config stored in the checkpoint",
        )
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)",
        )
        # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; the
        # rank is read from the environment (marscale.dist), so the flag is accepted and ignored.
        parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if name == "train":
        parser.add_argument(
            "--resume", default=None, metavar="auto|PATH",
            help="same as --set checkpoint.resume=...: 'auto' = newest complete checkpoint of the run",
        )
    if name == "eval":
        parser.add_argument(
            "--checkpoint", required=True,
            help="exported weights (.pt from `marscale export`, or any layout load_pretrained reads) or a "
            "DeepSpeed checkpoint folder (step-N, or a run folder: its newest complete checkpoint)",
        )
        parser.add_argument("--out", default=None, help="also write the result as JSON here")
    if name == "export":
        parser.add_argument(
            "--checkpoint", "--run-dir", dest="checkpoint", required=True,
            help="a step-N checkpoint folder, or a run/checkpoints folder (its newest complete checkpoint)",
        )
        parser.add_argument("--out", required=True, help="output file, e.g. model.pt")


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        return train_command(args)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "export":
        return export_command(args)
    raise ValueError(f"unknown command {args.command!r}")


def _prepare_device(device: str) -> None:
    # DeepSpeed picks its accelerator when first imported: make run.device=cpu stick on
    # a machine that has a GPU.
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def train_command(args: argparse.Namespace) -> int:
    from marscale import dist
    from marscale.engine.config import load_train_config
    from marscale.engine.trainer import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    _prepare_device(cfg.run.device)
    dist.init_distributed()
    dist.setup_logging()
    try:
        return train(cfg)
    finally:
        dist.destroy()


def _eval_config(args: argparse.Namespace, stored: dict | None):
    """The config of `--config` (+ overrides), or the one stored in the checkpoint."""
    from marscale.config import apply_overrides, from_dict
    from marscale.engine.config import TrainConfig, load_train_config

    if args.config:
        return load_train_config(args.config, args.overrides)
    if not stored:
        raise ValueError(f"{args.checkpoint} stores no config: pass --config")
    return from_dict(TrainConfig, apply_overrides(stored, args.overrides, TrainConfig))


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate weights on the config's evaluation shards, without DeepSpeed (collective)."""
    import torch

    from marscale import dist
    from marscale.checkpoint import CheckpointError, load_pretrained
    from marscale.engine.evaluate import evaluate
    from marscale.engine.export import consolidate
    from marscale.engine.trainer import PRECISION_DTYPES, resolve_device
    from marscale.model import build_model

    state, stored = None, None
    if os.path.isdir(args.checkpoint):
        state, client = consolidate(args.checkpoint)
        stored = client.get("config")
    elif not args.config:
        # Files written by `marscale export` carry their training config.
        stored = torch.load(args.checkpoint, map_location="cpu", weights_only=True, mmap=True).get("config")
    cfg = _eval_config(args, stored if isinstance(stored, dict) else None)
    # Weights first: a wrong checkpoint fails before any process group exists.
    model = build_model(cfg.model)
    if state is None:
        report = load_pretrained(model, args.checkpoint)
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
    _prepare_device(cfg.run.device)
    dist.init_distributed()
    dist.setup_logging()
    try:
        device = resolve_device(cfg.run.device)
        dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        model.to(device=device, dtype=dtype).eval()

        def forward(x, visible_idx, masked_idx):
            return model(x, visible_idx, masked_idx)["logits"]

        result = evaluate(
            forward, cfg.data, cfg.masking, cfg.model.token_grid, cfg.model.num_classes, device=device, dtype=dtype
        )
        record = {"checkpoint": os.path.abspath(args.checkpoint), **result.to_dict()}
        if dist.is_main():
            print(json.dumps(record, indent=1))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(record, f, indent=1)
                    f.write("\n")
        return 0
    finally:
        dist.destroy()


def export_command(args: argparse.Namespace) -> int:
    from marscale.engine.export import export

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = export(args.checkpoint, args.out)
    print(f"exported {path} -> {args.out}")
    return 0
