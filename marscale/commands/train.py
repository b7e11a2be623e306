"""`marscale train`: fine-tune a MAR model (or the ViT baseline) from shards.

    marscale train --config configs/demo.yaml [--set key=value ...] [--resume auto|PATH]

Runs as one plain process or as one rank of a launched job (deepspeed, torchrun, srun;
see launch/). Exit status: 0 finished, 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after
saving a checkpoint: run it again with `--resume auto` to continue; 69 (EX_UNAVAILABLE)
another rank was lost (its node died or dropped off the network; `run.collective_timeout_s`
bounds how long that takes to notice): start the job again with `--resume auto`; 1 or 2
another error.
"""

from __future__ import annotations

import argparse

from marscale.commands.common import add_config_arguments, prepare_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, required=True, help_text="YAML config: a file, or the name of a preset (e.g. mar_vit_l_k400)"
    )
    parser.add_argument(
        "--resume", default=None, metavar="auto|PATH",
        help="same as --set checkpoint.resume=...: 'auto' = newest complete checkpoint of the run",
    )


def run(args: argparse.Namespace) -> int:
    from marscale.core import dist, ds_ops
    from marscale.engine.config import load_train_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    # After the config is read: a bad config is one line, before DeepSpeed is imported.
    from marscale.engine.run import train
    prepare_device(cfg.run.device)
    ds_ops.prepare_op_builds()  # before DeepSpeed's backend: no CPU op build, no stale lock
    dist.init_distributed(timeout_s=cfg.run.collective_timeout_s)
    dist.setup_logging()
    lost = False
    try:
        return train(cfg)
    except dist.PeerLost:
        lost = True  # the group is broken: tearing it down could wait on the peer that is gone
        raise
    finally:
        if not lost:
            dist.destroy()
