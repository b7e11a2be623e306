"""Arguments and set-up shared by the commands that run a config (`train`, `eval`)."""

from __future__ import annotations

import argparse
import os


def add_config_arguments(parser: argparse.ArgumentParser, required: bool, help_text: str) -> None:
    """--config, repeatable --set KEY=VALUE, and the launcher's --local_rank."""
    parser.add_argument("--config", required=required, help=help_text)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; the
    # rank is read from the environment (marscale.core.dist), so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def prepare_device(device: str) -> None:
    """Make run.device=cpu stick on a machine that has a GPU: DeepSpeed picks its
    accelerator when it is first imported."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
