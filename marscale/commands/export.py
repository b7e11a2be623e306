"""`marscale export`: write a consolidated fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage.

    marscale export --checkpoint RUN/checkpoints/step-N|RUN --out model.pt
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", "--run-dir", dest="checkpoint", required=True,
        help="a step-N checkpoint folder, or a run/checkpoints folder (its newest complete checkpoint)",
    )
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")


def run(args: argparse.Namespace) -> int:
    from marscale.weights.export import export

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = export(args.checkpoint, args.out)
    print(f"exported {path} -> {args.out}")
    return 0
