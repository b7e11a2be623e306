"""The whole training path learns: synthetic videos -> shards -> loader -> MAR under
DeepSpeed -> multi-view evaluation, with accuracy clearly above chance after a fixed
number of steps.

The four classes (move right / left / down / up) differ only in the order of their
frames, so an image model stays at 25%; the tiny MAR model of configs/demo.yaml, on 8
frames of 64x64 with cell running masking at 50%, passes 80% validation top-1 within
200 steps (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import DEMO_CONFIG as CONFIG

from marscale.core import dist
from marscale.engine.config import load_train_config
from marscale.engine.metrics import by_step, read_jsonl
from marscale.engine.run import train
from marscale.engine.trainer import EVAL_FILE
from shards_tools.convert import convert_synthetic
from shards_tools.synth import make_synthetic_dataset

TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 25
STEPS = 200


@pytest.fixture(scope="module")
def learning_shards(tmp_path_factory) -> dict[str, str]:
    """4 classes x (100 train + 25 val) clips of 64x64, 16 frames, as shards."""
    root = str(tmp_path_factory.mktemp("learning_videos"))
    make_synthetic_dataset(
        root, num_classes=4, videos_per_class=TRAIN_PER_CLASS, val_videos_per_class=VAL_PER_CLASS,
        width=64, height=64, num_frames=16, seed=1, workers=2,
    )
    out_root = str(tmp_path_factory.mktemp("learning_shards"))
    convert_synthetic(root, out_root, samples_per_shard=25, progress=False)
    return {split: os.path.join(out_root, split) for split in ("train", "val")}


@pytest.mark.slow
def test_mar_learns_temporal_order_from_shards(learning_shards, tmp_path):
    dist.init_distributed()
    cfg = load_train_config(
        CONFIG,
        [
            f"data.train_shards={learning_shards['train']}",
            f"data.val_shards={learning_shards['val']}",
            f"run.output_dir={tmp_path}",
            "clip.num_frames=8",
            "optim.epochs=8",  # 400 videos x 2 clips / 32 = 25 steps per epoch
            "data.eval_batch_size=25",
            "logging.every_steps=25",
            "checkpoint.save_at_end=false",
        ],
    )
    assert train(cfg) == 0

    records = by_step(read_jsonl(os.path.join(tmp_path, "metrics.jsonl")))
    assert max(records) == STEPS
    first, last = records[25]["loss_cls"], records[STEPS]["loss_cls"]
    assert first > 1.2  # near ln 4 = 1.39 before it has learnt anything
    assert last < 0.5 * first, (first, last)

    with open(os.path.join(tmp_path, EVAL_FILE)) as f:
        result = json.load(f)
    assert result["step"] == STEPS
    assert result["num_videos"] == 4 * VAL_PER_CLASS  # every validation video, once
    # Chance is 25%; 100 held-out videos; seen reaching 85-100% (see module docstring).
    assert result["top1"] >= 70.0, result
