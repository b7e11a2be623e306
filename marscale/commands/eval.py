"""`marscale eval`: evaluate weights on the config's evaluation shards (multi-view, exact across ranks).

    marscale eval --checkpoint EXPORTED|model.pt|RUN/checkpoints/step-N|RUN [--config ...] [--set ...] [--out eval.json]
    marscale eval --checkpoint HF_FOLDER|hf:ORG/NAME --config CONFIG
    marscale eval --checkpoint ... --mask-ratios 0,0.25,0.5,0.75 [--out-dir DIR]

Without DeepSpeed: the weights are consolidated (or read) first, so a wrong checkpoint
fails before any process group exists. Runs as a plain process or one rank of a job.
Weights of another model (another size, another number of classes, no trained
classifier) are refused in one line naming the setting, whichever form they come in
(`load_state(need_classifier=True)`).
With `--mask-ratios` the same weights are scored once per evaluation mask ratio
(`marscale.commands.eval_ratios`: the ratios are checked before any weight is read).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from marscale.commands.common import add_config_arguments, prepare_device
from marscale.core.io import write_json

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, required=False,
        help_text="YAML config (file or preset name); default: the config stored in the checkpoint",
    )
    parser.add_argument(
        "--checkpoint", required=True,
        help="exported weights (a `marscale export` folder or .pt file, or any file, model folder or hf:ORG/NAME "
        "load_pretrained reads) or a DeepSpeed checkpoint folder (step-N, or a run folder: its newest complete "
        "checkpoint)",
    )
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--mask-ratios", default=None, metavar="R,R,...",
        help="evaluate once per evaluation mask ratio (0 = every token visible), e.g. 0,0.25,0.5,0.75, "
        "and write a table of accuracy against GFLOPs per view",
    )
    parser.add_argument(
        "--out-dir", default=None,
        help="with --mask-ratios: folder for eval_ratios.{md,csv,json,png} (default: RUN/eval_ratios for a "
        "checkpoint folder, ./eval_ratios for a file)",
    )


def _eval_config(args: argparse.Namespace, stored: dict | None):
    """The config of `--config` (+ overrides), or the one stored in the checkpoint."""
    from marscale.core.config import apply_overrides, drop_retired, from_dict
    from marscale.engine.config import TrainConfig, load_train_config

    overrides = args.overrides
    if args.mask_ratios is not None:
        # Each pass sets masking.eval_ratio itself. Loading with one (0 suits every kind of
        # mask) lets a config whose training draws several ratios, and so names no single
        # evaluation ratio, load as it is.
        overrides = ["masking.eval_ratio=0", *overrides]
    if args.config:
        return load_train_config(args.config, overrides)
    if not stored:
        raise ValueError(f"{args.checkpoint} stores no config: pass --config")
    stored, dropped = drop_retired(TrainConfig, stored)
    if dropped:
        logger.warning("the stored config sets %s, no longer settings: ignored", ", ".join(dropped))
    return from_dict(TrainConfig, apply_overrides(stored, overrides, TrainConfig))


def _open_checkpoint(args: argparse.Namespace) -> tuple[str | None, dict | None]:
    """(the checked step-N folder, or None for weights in a file or model folder; the
    training config stored with the weights, or None). Reads no weights: a checkpoint
    folder's model states are memory-mapped."""
    from marscale.checkpoints.integrity import read_model_states
    from marscale.checkpoints.folders import find_checkpoint
    from marscale.weights.export import exported_config
    from marscale.weights.hf import locate
    from marscale.weights.layouts import is_model_folder

    path = locate(args.checkpoint)  # hf:ORG/NAME: its folder in the local Hub cache
    if os.path.isdir(path) and not is_model_folder(path):
        folder = find_checkpoint(path)
        stored = read_model_states(folder).get("marscale", {}).get("config")
    elif not args.config:
        # `marscale export` stores the training config with the weights; anything that is
        # no readable checkpoint is a CheckpointError naming the file (one line, exit 78).
        folder, stored = None, exported_config(path)
    else:
        folder, stored = None, None
    return folder, stored if isinstance(stored, dict) else None


def _load_weights(model, args: argparse.Namespace, folder: str | None, cfg) -> None:
    """The checkpoint's weights into `model`, which must fit them whole with a trained
    classifier (checked, one line, before anything is loaded)."""
    from marscale.weights.export import consolidate_checked
    from marscale.weights.pretrained import load_pretrained, load_state

    if folder is not None:
        load_state(model, consolidate_checked(folder)[0], source=folder, layout="marscale", need_classifier=True)
    else:
        load_pretrained(model, args.checkpoint, clip=cfg.clip, need_classifier=True)


def run(args: argparse.Namespace) -> int:
    """Evaluate weights on the config's evaluation shards, without DeepSpeed (collective)."""
    from marscale.core import dist
    from marscale.commands import eval_ratios
    from marscale.engine.config import PRECISION_DTYPES
    from marscale.engine.evaluate import evaluate
    from marscale.engine.preflight import preflight
    from marscale.model import build_model

    if args.mask_ratios is None and args.out_dir is not None:
        raise ValueError("--out-dir is where --mask-ratios writes its table: pass --mask-ratios too")
    if args.mask_ratios is not None and args.out is not None:
        raise ValueError("--out writes one evaluation; with --mask-ratios the files go to --out-dir")
    ratios = None if args.mask_ratios is None else eval_ratios.parse_ratios(args.mask_ratios)
    folder, stored = _open_checkpoint(args)
    cfg = _eval_config(args, stored)
    # Every ratio checked (and its cost counted) before any weight is read: a ratio the
    # model's masking cannot take is one line at once.
    passes = None if ratios is None else eval_ratios.plan_passes(cfg, ratios)
    # Weights first: a wrong checkpoint fails before any process group exists.
    model = build_model(cfg.model, cfg.clip)
    _load_weights(model, args, folder, cfg)
    prepare_device(cfg.run.device)
    dist.init_distributed()
    dist.setup_logging()
    try:
        plan = preflight(cfg, dist.get_world_size(), training=False)
        device = dist.resolve_device(cfg.run.device)
        dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        model.to(device=device, dtype=dtype).eval()
        model.set_attention(cfg.model.attention, device)  # the kernel for where it now runs

        def forward(x, tokens):
            return model(x, tokens)["logits"]

        if passes is not None:
            rows = eval_ratios.evaluate_ratios(forward, cfg, plan, passes, device=device, dtype=dtype)
            if dist.is_main():
                out_dir = args.out_dir or eval_ratios.default_out_dir(args.checkpoint, folder)
                eval_ratios.report(rows, cfg, args.checkpoint, folder, device, out_dir)
            return 0
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
