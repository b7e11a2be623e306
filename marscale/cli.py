"""`marscale` console script: the one dispatcher; each sub-command is its own module in
`marscale/commands/`.

    marscale train  --config configs/demo.yaml [--set key=value ...] [--resume auto]
    marscale eval   --checkpoint PATH [--config ...] [--mask-ratios 0,0.25,0.5,0.75]
    marscale export --checkpoint RUN --out model.pt
    marscale cost   [--format table|csv|json|markdown]
    marscale compare [CONFIG[:key=value...] ...] [--quick] [--out DIR]
    marscale demo   (synthetic data -> shards -> train -> eval -> cost table)

Sub-command modules are imported only when used, so `marscale cost` does not pay for
DeepSpeed's import.
"""

from __future__ import annotations

import importlib
import os
import sys

from marscale.core import exits

# name -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "train": ("marscale.commands.train", "fine-tune a MAR model (or the ViT baseline) from shards"),
    "eval": ("marscale.commands.eval", "evaluate a checkpoint (multi-view, exact across ranks; or per mask ratio)"),
    "predict": ("marscale.commands.predict", "classify video files with trained weights (top-k classes, s/video, GFLOPs)"),
    "export": ("marscale.commands.export", "write a consolidated fp32 state dict from a DeepSpeed checkpoint"),
    "demo": ("marscale.commands.demo", "render synthetic data, shard it, train a tiny MAR model, evaluate"),
    "cost": ("marscale.commands.cost", "parameter and FLOP table for ViT-S/B/L/H/g, full tokens vs MAR"),
    "compare": ("marscale.commands.compare", "MAR vs full-token ViTs: counted cost beside time measured on the engine"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status follows `marscale.core.exits` (recorded for the
    launch wrapper when it asks: `MARSCALE_STATUS_DIR`)."""
    status = exits.FAILED  # an exception that escapes is an unforeseen error
    try:
        status = _run(argv)
        return status
    except SystemExit as e:  # argparse: 2 for a wrong command line, 0 for --help
        status = e.code if isinstance(e.code, int) else exits.USAGE
        raise
    finally:
        exits.record(status)


def _run(argv: list[str] | None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="marscale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    name = argv[0] if argv and argv[0] in COMMANDS else None
    for cmd, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text, description=help_text)
        if cmd == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input (configs, checkpoints, shard folders; ConfigError and CheckpointError
        # are ValueErrors), a diverged run, a full disk and a lost peer end with one line naming
        # the problem.
        # Anything else, or MARSCALE_TRACEBACK=1, keeps the full traceback.
        if os.environ.get("MARSCALE_TRACEBACK") == "1" or not _is_reported(e):
            raise
        print(f"marscale {args.command}: error: {e}", file=sys.stderr)
        from marscale.core.dist import PeerLost

        if isinstance(e, PeerLost):
            return exits.PEER_LOST
        return exits.BAD_INPUT if isinstance(e, (ValueError, FileNotFoundError)) else exits.FAILED


def _is_reported(error: BaseException) -> bool:
    """Errors whose message is the whole story: input errors, a diverged loss, a full disk,
    a lost peer."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return True
    from marscale.core.dist import PeerLost
    from marscale.checkpoints.folders import NoSpaceLeft
    from marscale.engine.trainer import TrainingDiverged

    return isinstance(error, (TrainingDiverged, NoSpaceLeft, PeerLost))


if __name__ == "__main__":
    sys.exit(main())
