"""`marscale export`: write consolidated fp32 weights from a DeepSpeed checkpoint of any ZeRO stage.

    marscale export --checkpoint RUN/checkpoints/step-N|RUN --out DIR         # DIR/model.safetensors + config.json
    marscale export --checkpoint RUN --out model.pt                           # one pickled file (--format torch)
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from marscale.weights.export import EXPORT_FORMATS

    parser.add_argument(
        "--checkpoint", "--run-dir", dest="checkpoint", required=True,
        help="a step-N checkpoint folder, or a run/checkpoints folder (its newest complete checkpoint)",
    )
    parser.add_argument(
        "--out", required=True,
        help="output: a folder for safetensors (model.safetensors and config.json), a file for torch (model.pt)",
    )
    parser.add_argument(
        "--format", choices=EXPORT_FORMATS, default=None,
        help="safetensors (a folder: tensors and a JSON header, no pickle) or torch (one pickled file); default: "
        "torch for an --out ending in .pt or .pth, else safetensors",
    )


def run(args: argparse.Namespace) -> int:
    from marscale.weights.export import export

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = export(args.checkpoint, args.out, format=args.format)
    print(f"exported {path} -> {args.out}")
    return 0
