"""`marscale train`: fine-tune a MAR model (or the ViT baseline) from shards.

    marscale train --config configs/demo.yaml [--set key=value ...] [--resume auto|PATH]

Runs as one plain process or as one rank of a launched job (deepspeed, torchrun, srun;
see launch/). Exit status (`marscale.core.exits`): 0 finished; 75 (EX_TEMPFAIL) stopped by
SIGTERM/SIGUSR1 after saving a checkpoint; 69 (EX_UNAVAILABLE) another rank was lost (its
node died or dropped off the network: `run.collective_timeout_s` bounds how long that takes
to notice; or it did not join within `run.setup_timeout_s`): for both, run it again with
`--resume auto`; 78 (EX_CONFIG) a bad configuration or input; 1 an unforeseen error; 2 a
wrong command line.
"""

from __future__ import annotations

import argparse
import signal

from marscale.commands.common import add_config_arguments, prepare_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, required=True, help_text="YAML config: a file, or the name of a preset (e.g. mar_vit_l_k400)"
    )
    parser.add_argument(
        "--resume", default=None, metavar="auto|PATH",
        help="same as --set checkpoint.resume=...: 'auto' = newest complete checkpoint of the run",
    )


def _ignore(signum, frame) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from marscale.core import dist, ds_ops
    from marscale.engine.config import load_train_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    # After the config is read: a bad config is one line, before DeepSpeed is imported.
    from marscale.core.signals import STOP_SIGNALS
    from marscale.engine.run import train
    prepare_device(cfg.run.device)
    ds_ops.prepare_op_builds()  # before DeepSpeed's backend: no CPU op build, no stale lock
    dist.init_distributed(timeout_s=cfg.run.collective_timeout_s, setup_timeout_s=cfg.run.setup_timeout_s)
    dist.setup_logging()
    lost = False
    try:
        return train(cfg)
    except dist.PeerLost:
        lost = True  # the group is broken: tearing it down could wait on the peer that is gone
        raise
    finally:
        # Training is over (finished, saved or failed): a pre-emption signal arriving now
        # must not turn the status this process is about to return into "killed".
        for s in STOP_SIGNALS:
            signal.signal(s, _ignore)  # a Python handler: processes started later do not inherit it
        if not lost:
            dist.destroy()
