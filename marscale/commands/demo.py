"""`marscale demo`: synthetic videos -> shards -> train a tiny MAR model -> evaluate -> cost.

Every stage runs in this one process (DeepSpeed with a one-rank group) and is skipped
when its output is already there, so a second run only prints the results:

    <out>/data/videos/        rendered clips; <out>/data/ holds train.txt / val.txt / classes.txt
    <out>/data/shards/{train,val}/   WebDataset shards + manifest.json
    <out>/run/                the training run (config, metrics, checkpoints, eval.json)

The synthetic classes differ only in the order of their frames (see
`marscale-shards synth`), so a model that learns them has learnt something about time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

from marscale.core.io import write_json
from marscale.data.shards import manifest_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo"
"""The packaged preset `marscale/configs/demo.yaml` (found in an installed wheel too)."""
DONE_MARKER = ".done"

# (train videos per class, val videos per class): the full demo and --quick.
SIZES = {"full": (250, 50), "quick": (24, 8)}
NUM_CLASSES = 4
VIDEO_SIZE = 64
VIDEO_FRAMES = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for data, shards and the run")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps (a smoke run)")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="training config: a file or a preset name (default: demo)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a training config value (repeatable)",
    )


def prepare_data(root: str, train_per_class: int, val_per_class: int) -> dict[str, str]:
    """Stages 1-2: render the synthetic videos and shard them, with `marscale-shards synth`.

    The dataset tools are a separate layer above the library, so the demo runs them as
    a user would, through their command (printed). Skipped when both shard sets exist.
    """
    shard_root = os.path.join(root, "shards")
    shards = {split: os.path.join(shard_root, split) for split in ("train", "val")}
    marker = os.path.join(root, DONE_MARKER)
    wanted = {"train_per_class": train_per_class, "val_per_class": val_per_class}
    done = all(os.path.isfile(manifest_path(path)) for path in shards.values())
    if done and os.path.isfile(marker) and json.load(open(marker)) == wanted:
        logger.info("synthetic shards already in %s", shard_root)
        return shards
    tool = shutil.which("marscale-shards", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if tool is None:
        raise FileNotFoundError("the marscale-shards command is not installed (pip install -e . installs it)")
    command = [
        tool, "synth", "--out", root, "--num-classes", str(NUM_CLASSES),
        "--videos-per-class", str(train_per_class), "--val-videos-per-class", str(val_per_class),
        "--size", f"{VIDEO_SIZE}x{VIDEO_SIZE}", "--frames", str(VIDEO_FRAMES), "--seed", "0",
        "--workers", str(min(2, os.cpu_count() or 1)), "--shards", "--samples-per-shard", "8",
    ]
    logger.info("preparing data: %s", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True)
    write_json(marker, wanted)
    logger.info("rendered and sharded %d videos in %.0fs", (train_per_class + val_per_class) * NUM_CLASSES,
                time.perf_counter() - start)
    return shards


def print_cost(model_cfg, clip_cfg, mask_ratio: float) -> None:
    """The demo model's cost, full tokens vs MAR, then the standard ViT table."""
    import dataclasses

    from marscale.commands.cost import format_table
    from marscale.cost.counting import count_model
    from marscale.cost.table import cost_table

    print("\nCost of the demo model per clip (MACs, the papers' 'FLOPs'):")
    for name, cfg, ratio in (
        ("full tokens", dataclasses.replace(model_cfg, arch="vit"), 0.0),
        (f"MAR {round(mask_ratio * 100)}%", model_cfg, mask_ratio),
    ):
        c = count_model(cfg, clip_cfg, ratio)
        print(
            f"  {name:12s} {c.visible_tokens:4d}/{c.tokens} tokens  inference {c.macs_inference / 1e6:8.1f} M"
            f"  training {c.macs_training / 1e6:8.1f} M  params {c.params_training / 1e6:.2f} M"
        )
    print("\nStandard sizes at 16 x 224 x 224 (marscale cost):")
    print(format_table(cost_table(["vit_b", "vit_l"], [0.0, 0.5, 0.75])))


def run(args: argparse.Namespace) -> int:
    from marscale.core import dist
    from marscale.engine.config import load_train_config
    from marscale.engine.run import train
    from marscale.engine.trainer import EVAL_FILE

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    out = args.out
    train_per_class, val_per_class = SIZES["quick" if args.quick else "full"]
    shards = prepare_data(os.path.join(out, "data"), train_per_class, val_per_class)
    data_seconds = time.perf_counter() - start

    run_dir = os.path.join(out, "run-quick" if args.quick else "run")
    overrides = [
        f"data.train_shards={shards['train']}",
        f"data.val_shards={shards['val']}",
        f"run.output_dir={run_dir}",
        "checkpoint.resume=auto",  # a re-run continues (or skips) the finished training
    ]
    if args.quick:
        overrides += ["optim.epochs=4"]
    cfg = load_train_config(args.config, overrides + list(args.overrides))

    eval_file = os.path.join(run_dir, EVAL_FILE)
    train_start = time.perf_counter()
    finished = os.path.isfile(eval_file) and _finished(eval_file, cfg)
    if finished:
        logger.info("training already finished in %s", run_dir)
    else:
        dist.init_distributed()
        dist.setup_logging()
        try:
            code = train(cfg)
        finally:
            dist.destroy()
        if code != 0:
            return code
    train_seconds = time.perf_counter() - train_start

    result = json.load(open(eval_file))
    chance = 100.0 / cfg.model.num_classes
    print(f"\nDemo run: {run_dir}")
    print(f"  data {data_seconds:.0f}s, training + evaluation {train_seconds:.0f}s, total {time.perf_counter() - start:.0f}s")
    print(
        f"  validation top-1 {result['top1']:.1f}% (chance {chance:.0f}%), top-5 {result['top5']:.1f}% "
        f"over {result['num_videos']} videos x {cfg.data.views_per_video} views, after {result['step']} steps"
    )
    print_cost(cfg.model, cfg.clip, cfg.masking.ratio_at(train=True))
    return 0


def _finished(eval_file: str, cfg) -> bool:
    from marscale.engine.plan import make_plan

    with open(eval_file) as f:
        return json.load(f).get("step") == make_plan(cfg, world_size=1).total_steps
