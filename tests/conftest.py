"""Shared pytest fixtures: a small synthetic video dataset and its shards.

Both are session-scoped and built once (a few seconds on a 2-core CPU):

- `synthetic_videos`: root of a 4-class synthetic action dataset (64x64, 32 frames,
  4 train + 2 val videos per class) as written by `shards_tools.synth`:
  ``videos/<class>/*.mp4``, ``train.txt``, ``val.txt``, ``classes.txt``.
- `synthetic_shards`: ``{"train": dir, "val": dir}``, that dataset converted to shards
  with 2 samples per shard (8 train shards, 4 val shards: enough for 2 ranks x 2 workers).
- `demo_run` (session, slow: about a minute of training on 2 idle cores): configs/demo.yaml
  trained briefly on the demo's synthetic classes, in `marscale demo`'s folder layout,
  with its exported weights.
- `single_thread` (module scope, opt-in): torch on one intra-op thread for the module.
- `no_count_cache` (session, automatic): `MARSCALE_CACHE_DIR=""` for the tests and every
  process they start, so no test reads or writes the user's FLOP count cache (the cache
  tests point it at their own folders).

Helpers shared by the engine tests (tiny clip overrides, child-process environment)
are in helpers.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from shards_tools.convert import convert_synthetic
from shards_tools.synth import make_synthetic_dataset

SYNTH_NUM_CLASSES = 4
SYNTH_TRAIN_PER_CLASS = 4
SYNTH_VAL_PER_CLASS = 2
SYNTH_SIZE = 64
SYNTH_FRAMES = 32
SYNTH_SAMPLES_PER_SHARD = 2


@pytest.fixture(scope="session", autouse=True)
def no_count_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARSCALE_CACHE_DIR", "")
        yield


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic_videos"))
    make_synthetic_dataset(
        root,
        num_classes=SYNTH_NUM_CLASSES,
        videos_per_class=SYNTH_TRAIN_PER_CLASS,
        val_videos_per_class=SYNTH_VAL_PER_CLASS,
        width=SYNTH_SIZE,
        height=SYNTH_SIZE,
        num_frames=SYNTH_FRAMES,
        fps=16.0,
        seed=0,
    )
    return root


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, synthetic_videos) -> dict[str, str]:
    out_root = str(tmp_path_factory.mktemp("synthetic_shards"))
    convert_synthetic(synthetic_videos, out_root, samples_per_shard=SYNTH_SAMPLES_PER_SHARD, progress=False)
    return {split: os.path.join(out_root, split) for split in ("train", "val")}


# The demo's classes, learnt for `demo_run`: 250 steps of configs/demo.yaml (100 training
# videos per class, 10 epochs of 25 steps) on 8 of each video's frames. That is the
# cheapest run measured whose classes came out right on freshly rendered videos: with 16
# frames (the demo's) each step costs twice as much; at 200 steps one of 32 fresh videos
# was wrong, as with 250 steps of single-clip batches of 16.
DEMO_TRAIN_PER_CLASS = 100
DEMO_RUN_OVERRIDES = ("clip.num_frames=8", "optim.epochs=10")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`workdir/runs/demo/` as `marscale demo` leaves it (data/videos/<class>/, data/shards/
    {train,val}, run/ with a ZeRO-2 checkpoint), plus run's weights exported to model.pt."""
    import types

    from helpers import DEMO_CONFIG

    from marscale.commands.demo import NUM_CLASSES, VIDEO_FRAMES, VIDEO_SIZE
    from marscale.checkpoints.folders import step_of
    from marscale.core import dist
    from marscale.engine.config import load_train_config
    from marscale.engine.run import train
    from marscale.weights.export import export

    workdir = tmp_path_factory.mktemp("demo_workdir")
    demo = workdir / "runs" / "demo"
    data = str(demo / "data")
    make_synthetic_dataset(
        data, num_classes=NUM_CLASSES, videos_per_class=DEMO_TRAIN_PER_CLASS, val_videos_per_class=1,
        width=VIDEO_SIZE, height=VIDEO_SIZE, num_frames=VIDEO_FRAMES, seed=0, workers=2,
    )
    convert_synthetic(data, os.path.join(data, "shards"), samples_per_shard=16, workers=2, progress=False)
    cfg = load_train_config(DEMO_CONFIG, [
        f"data.train_shards={data}/shards/train", f"data.val_shards={data}/shards/val",
        f"run.output_dir={demo / 'run'}", "logging.tensorboard=false", *DEMO_RUN_OVERRIDES,
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a module may have asked for one (single_thread)
    dist.init_distributed()
    try:
        assert train(cfg) == 0
    finally:
        dist.destroy()
        torch.set_num_threads(threads)
    folder = export(str(demo / "run"), str(demo / "model.pt"))
    return types.SimpleNamespace(
        workdir=str(workdir), run=str(demo / "run"), file=str(demo / "model.pt"), cfg=cfg, step=step_of(folder)
    )


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("single_thread")`):
    on a small shared CPU, intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
