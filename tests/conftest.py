"""Shared pytest fixtures: a small synthetic video dataset and its shards.

Both are session-scoped and built once (a few seconds on a 2-core CPU):

- `synthetic_videos`: root of a 4-class synthetic action dataset (64x64, 32 frames,
  4 train + 2 val videos per class) as written by `shards_tools.synth`:
  ``videos/<class>/*.mp4``, ``train.txt``, ``val.txt``, ``classes.txt``.
- `synthetic_shards`: ``{"train": dir, "val": dir}``, that dataset converted to shards
  with 2 samples per shard (8 train shards, 4 val shards: enough for 2 ranks x 2 workers).
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


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("single_thread")`):
    on a small shared CPU, intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
