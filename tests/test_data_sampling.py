"""Frame index functions (marscale.data.sampling) and DataConfig checks."""

from __future__ import annotations

import numpy as np
import pytest

from marscale.data import DataConfig
from marscale.data import sampling


def test_dense_train_windows_cover_every_start():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(3000):
        idx = sampling.dense_train_indices(100, 4, 4, rng)
        assert idx.dtype == np.int64 and idx.shape == (4,)
        np.testing.assert_array_equal(np.diff(idx), [4, 4, 4])
        starts.add(int(idx[0]))
    # span = 3 * 4 + 1 = 13 frames, so starts are 0..87, all reachable.
    assert starts == set(range(88))


def test_dense_short_video_repeats_last_frame():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sampling.dense_train_indices(10, 4, 4, rng), [0, 4, 8, 9])
    np.testing.assert_array_equal(sampling.dense_train_indices(1, 3, 4, rng), [0, 0, 0])
    np.testing.assert_array_equal(sampling.dense_eval_indices(10, 4, 4, 2), [[0, 4, 8, 9], [0, 4, 8, 9]])


def test_dense_eval_windows_evenly_spaced():
    np.testing.assert_array_equal(
        sampling.dense_eval_indices(100, 4, 4, 3), [[0, 4, 8, 12], [43, 47, 51, 55], [87, 91, 95, 99]]
    )
    np.testing.assert_array_equal(sampling.dense_eval_indices(100, 4, 4, 1), [[43, 47, 51, 55]])
    np.testing.assert_array_equal(sampling.dense_eval_indices(13, 4, 4, 5), np.tile([0, 4, 8, 12], (5, 1)))


def test_segment_train_one_frame_per_segment():
    rng = np.random.default_rng(1)
    seen = [set() for _ in range(4)]
    for _ in range(2000):
        idx = sampling.segment_train_indices(33, 4, rng)
        for i, v in enumerate(idx.tolist()):
            seen[i].add(v)
    # (33 - 1) / 4 = 8 frames a segment; bounds inclusive as in the reference code.
    assert seen == [set(range(0, 9)), set(range(8, 17)), set(range(16, 25)), set(range(24, 33))]


def test_segment_eval_centre_and_clips():
    np.testing.assert_array_equal(sampling.segment_eval_indices(33, 4, 1), [[4, 12, 20, 28]])
    np.testing.assert_array_equal(sampling.segment_eval_indices(33, 4, 2), [[2, 10, 18, 26], [6, 14, 22, 30]])


def test_segment_short_videos_stay_in_range():
    rng = np.random.default_rng(0)
    for length in (1, 2, 3, 7):
        idx = sampling.segment_train_indices(length, 16, rng)
        assert idx.shape == (16,) and idx.min() >= 0 and idx.max() <= length - 1
        assert np.all(np.diff(idx) >= 0)  # temporal order is kept
        ev = sampling.segment_eval_indices(length, 16, 2)
        assert ev.shape == (2, 16) and ev.min() >= 0 and ev.max() <= length - 1
    np.testing.assert_array_equal(sampling.segment_eval_indices(1, 4, 1), [[0, 0, 0, 0]])


def test_dispatch_and_errors():
    rng = np.random.default_rng(0)
    assert sampling.train_indices("segment", 33, 4, 99, rng).shape == (4,)
    np.testing.assert_array_equal(sampling.eval_indices("dense", 100, 4, 4, 1), [[43, 47, 51, 55]])
    with pytest.raises(ValueError, match="dense"):
        sampling.train_indices("uniform", 10, 4, 4, rng)
    with pytest.raises(ValueError, match="at least one frame"):
        sampling.dense_train_indices(0, 4, 4, rng)


def _cfg(**kw) -> DataConfig:
    return DataConfig(train_shards="train", val_shards="val", **kw)


def test_config_defaults_and_yaml_lists():
    from marscale.clip import ClipConfig

    cfg = _cfg(rrc_scale=[0.2, 1])
    assert cfg.rrc_scale == (0.2, 1.0) and isinstance(cfg.rrc_scale, tuple)
    assert ClipConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    assert _cfg(batch_size=8, clips_per_video=2).videos_per_batch == 4
    assert _cfg(test_num_clips=5, test_num_crops=3).views_per_video == 15


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(decoder="opencv"), "decord"),
        (dict(batch_size=6, clips_per_video=4), "must divide batch_size"),
        (dict(rand_augment="m9"), "RandAugment"),
        (dict(rrc_scale=(0.5, 0.1)), "rrc_scale"),
        (dict(batch_size=3), "even batch_size"),
        (dict(random_erasing=1.5), "probability"),
        (dict(samples_per_epoch=0), "samples_per_epoch"),
    ],
)
def test_config_errors_say_how_to_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


@pytest.mark.parametrize(
    "kw, message",
    [(dict(sampling="uniform"), "segment"), (dict(num_frames=0), "num_frames"), (dict(std=(0.2, 0.0, 0.2)), "std > 0")],
)
def test_clip_errors_say_how_to_fix(kw, message):
    # Sampling and the clip shape are the clip section's (short_side vs img_size is a
    # cross-section check: tests/test_config.py).
    from marscale.clip import ClipConfig

    with pytest.raises(ValueError, match=message):
        ClipConfig(**kw)


def test_odd_batch_allowed_without_mixing():
    assert _cfg(batch_size=3, mixup=0.0, cutmix=0.0).batch_size == 3


def test_package_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, marscale.data as d; d.DataConfig(train_shards='a', val_shards='b');"
        "heavy = [m for m in ('webdataset', 'decord', 'av', 'timm', 'PIL') if m in sys.modules];"
        "assert not heavy, heavy; d.build_train_loader; assert 'webdataset' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
