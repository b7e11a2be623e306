"""Frame index functions (marscale.data.sampling) and DataConfig checks."""

from __future__ import annotations

import numpy as np
import pytest

from marscale.core.clip import ClipConfig
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
    assert sampling.train_indices(ClipConfig(sampling="segment", num_frames=4), 33, 25.0, rng).shape == (4,)
    dense = ClipConfig(num_frames=4, sampling_interval=4)
    np.testing.assert_array_equal(sampling.eval_indices(dense, 100, 25.0, 1), [[43, 47, 51, 55]])
    # The fixed interval ignores the frame rate and draws exactly as dense_train_indices.
    np.testing.assert_array_equal(
        sampling.train_indices(dense, 100, 12.5, np.random.default_rng(5)),
        sampling.dense_train_indices(100, 4, 4, np.random.default_rng(5)),
    )
    with pytest.raises(ValueError, match="at least one frame"):
        sampling.dense_train_indices(0, 4, 4, rng)


# The MAR reference's K400 windows (16 frames, interval 4 at 30 fps), computed with its own
# formula (torch.linspace(s, s + 16 * 4 * fps / 30 - 1, 16), clamped, .long()).
K400_CLIP = ClipConfig(num_frames=16, sampling_interval=4, sampling_fps=30.0)


def test_fps_scaled_eval_windows_at_30_fps():
    # 300 frames: window length 64, last start 236; 5 clips start at k * floor(236 / 4) = 59k.
    got = sampling.eval_indices(K400_CLIP, 300, 30.0, 5)
    assert got.dtype == np.int64 and got.shape == (5, 16)
    np.testing.assert_array_equal(got[0], [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63])
    np.testing.assert_array_equal(got[:, 0], [0, 59, 118, 177, 236])
    np.testing.assert_array_equal(
        got[4], [236, 240, 244, 248, 252, 257, 261, 265, 269, 273, 278, 282, 286, 290, 294, 299]
    )
    np.testing.assert_array_equal(got[:, -1] - got[:, 0], [63] * 5)
    # One clip: start 236 / 2.
    np.testing.assert_array_equal(
        sampling.eval_indices(K400_CLIP, 300, 30.0, 1),
        [[118, 122, 126, 130, 134, 139, 143, 147, 151, 155, 160, 164, 168, 172, 176, 181]],
    )


def test_fps_scaled_eval_windows_at_25_fps():
    # 250 frames: window length 64 * 25 / 30 = 53.33, last start 196.67; starts 49k.
    got = sampling.eval_indices(K400_CLIP, 250, 25.0, 5)
    np.testing.assert_array_equal(got[0], [0, 3, 6, 10, 13, 17, 20, 24, 27, 31, 34, 38, 41, 45, 48, 52])
    np.testing.assert_array_equal(got[:, 0], [0, 49, 98, 147, 196])
    np.testing.assert_array_equal(
        got[4], [196, 199, 202, 206, 209, 213, 216, 220, 223, 227, 230, 234, 237, 241, 244, 248]
    )
    np.testing.assert_array_equal(
        sampling.eval_indices(K400_CLIP, 250, 25.0, 1),
        [[98, 101, 105, 108, 112, 115, 119, 122, 126, 129, 133, 136, 140, 143, 147, 150]],
    )
    assert sampling.scaled_dense_length(16, 4, 25.0 / 30.0) == pytest.approx(160 / 3)


def test_fps_scaled_train_windows():
    rng = np.random.default_rng(0)
    for fps, spans, steps, last_first in ((30.0, {63}, {4, 5}, 235), (25.0, {52, 53}, {3, 4}, 246)):
        firsts, seen_spans, seen_steps = set(), set(), set()
        for _ in range(4000):
            idx = sampling.train_indices(K400_CLIP, 300, fps, rng)
            assert idx.dtype == np.int64 and idx.shape == (16,)
            firsts.add(int(idx[0]))
            seen_spans.add(int(idx[-1] - idx[0]))
            seen_steps |= set(np.diff(idx).tolist())
        assert seen_spans == spans and seen_steps == steps
        # Float starts uniform in [0, 300 - length] (236, 246.67): every whole start up to its floor.
        assert firsts == set(range(last_first + 1))


def test_fps_scaled_short_video_repeats_last_frame():
    # 40 frames at 30 fps: shorter than the 64-frame window, which starts at 0 and is clamped.
    expected = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 39, 39, 39, 39, 39, 39]
    np.testing.assert_array_equal(sampling.train_indices(K400_CLIP, 40, 30.0, np.random.default_rng(0)), expected)
    np.testing.assert_array_equal(sampling.eval_indices(K400_CLIP, 40, 30.0, 3), [expected] * 3)


@pytest.mark.parametrize("fps", [0.0, float("nan"), -25.0])
def test_fps_scaled_needs_a_frame_rate(fps):
    with pytest.raises(sampling.FrameRateError, match="frame rate"):
        sampling.train_indices(K400_CLIP, 300, fps, np.random.default_rng(0))
    with pytest.raises(sampling.FrameRateError):
        sampling.eval_indices(K400_CLIP, 300, fps, 2)


def _cfg(**kw) -> DataConfig:
    return DataConfig(train_shards="train", val_shards="val", **kw)


def test_config_defaults_and_yaml_lists():
    cfg = _cfg(rrc_scale=[0.2, 1])
    assert cfg.rrc_scale == (0.2, 1.0) and isinstance(cfg.rrc_scale, tuple)
    assert ClipConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    assert _cfg(batch_size=8, clips_per_video=2).videos_per_batch == 4
    assert _cfg(test_num_clips=5, test_num_crops=3).views_per_video == 15
    # Flip pairs: none by default; YAML lists become tuples; the map swaps both ways.
    assert _cfg().flip_label_pairs == () and _cfg().flip_label_map == {}
    pairs = _cfg(flip_label_pairs=[[86, 87], [93, 94]])
    assert pairs.flip_label_pairs == ((86, 87), (93, 94))
    assert pairs.flip_label_map == {86: 87, 87: 86, 93: 94, 94: 93}
    assert (_cfg().clip_windows, _cfg().rand_augment_before_crop, ClipConfig().sampling_fps) == ("shared", False, None)


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
        (dict(clip_windows="both"), "'shared', 'independent'"),
        (dict(flip_label_pairs=[(1, 1)]), "two different class indices"),
        (dict(flip_label_pairs=[(-1, 2)]), "two different class indices >= 0"),
        (dict(flip_label_pairs=[(1, 2), (3, 2)]), "class 2 is in more than one pair"),
        (dict(flip_label_pairs=[(1, 2, 3)]), r"\[a, b\] pairs"),
        (dict(flip_label_pairs=[(1.0, 2)]), r"\[a, b\] pairs"),
    ],
)
def test_config_errors_say_how_to_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sampling="uniform"), "segment"),
        (dict(num_frames=0), "num_frames"),
        (dict(std=(0.2, 0.0, 0.2)), "std > 0"),
        (dict(sampling_fps=0), "sampling_fps must be > 0"),
        (dict(sampling="segment", sampling_fps=30.0), "dense windows only"),
    ],
)
def test_clip_errors_say_how_to_fix(kw, message):
    # Sampling and the clip shape are the clip section's (short_side vs img_size is a
    # cross-section check: tests/test_config.py).
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
