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


# The MAR reference's segment rule (clip.segment_rule "reference"), written out from its
# formula for T = 16: segment i spans [L * i / 16, L * (i + 1) / 16]; one test clip at the
# centres, clip k of n > 1 at k / (n - 1) of each segment; clamped to L - 1, rounded half
# to even. E.g. L = 20: segments 1.25 frames long, centre of segment 1 at 1.875 -> 2;
# segment 3 starts at 3.75 -> 4; the last segment ends at 20 -> clamped to 19.
REFERENCE_EVAL = {
    16: {
        1: [[0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14, 15]],
        2: [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15]],
        3: [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            [0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14, 15],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15]],
    },
    20: {
        1: [[1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19]],
        2: [[0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19],
            [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19, 19]],
        3: [[0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19],
            [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19],
            [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19, 19]],
    },
    33: {
        1: [[1, 3, 5, 7, 9, 11, 13, 15, 18, 20, 22, 24, 26, 28, 30, 32]],
        2: [[0, 2, 4, 6, 8, 10, 12, 14, 16, 19, 21, 23, 25, 27, 29, 31],
            [2, 4, 6, 8, 10, 12, 14, 16, 19, 21, 23, 25, 27, 29, 31, 32]],
        3: [[0, 2, 4, 6, 8, 10, 12, 14, 16, 19, 21, 23, 25, 27, 29, 31],
            [1, 3, 5, 7, 9, 11, 13, 15, 18, 20, 22, 24, 26, 28, 30, 32],
            [2, 4, 6, 8, 10, 12, 14, 16, 19, 21, 23, 25, 27, 29, 31, 32]],
    },
    47: {
        1: [[1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46]],
        2: [[0, 3, 6, 9, 12, 15, 18, 21, 24, 26, 29, 32, 35, 38, 41, 44],
            [3, 6, 9, 12, 15, 18, 21, 24, 26, 29, 32, 35, 38, 41, 44, 46]],
        3: [[0, 3, 6, 9, 12, 15, 18, 21, 24, 26, 29, 32, 35, 38, 41, 44],
            [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46],
            [3, 6, 9, 12, 15, 18, 21, 24, 26, 29, 32, 35, 38, 41, 44, 46]],
    },
    120: {
        1: [[4, 11, 19, 26, 34, 41, 49, 56, 64, 71, 79, 86, 94, 101, 109, 116]],
        2: [[0, 8, 15, 22, 30, 38, 45, 52, 60, 68, 75, 82, 90, 98, 105, 112],
            [8, 15, 22, 30, 38, 45, 52, 60, 68, 75, 82, 90, 98, 105, 112, 119]],
        3: [[0, 8, 15, 22, 30, 38, 45, 52, 60, 68, 75, 82, 90, 98, 105, 112],
            [4, 11, 19, 26, 34, 41, 49, 56, 64, 71, 79, 86, 94, 101, 109, 116],
            [8, 15, 22, 30, 38, 45, 52, 60, 68, 75, 82, 90, 98, 105, 112, 119]],
    },
}

# Training, T = 16: the frames segment i can give, (first, last). A position uniform in
# [L * i / 16, L * (i + 1) / 16) rounds to every frame whose half-open neighbourhood it
# overlaps: first = floor(lo + 0.5), last = ceil(hi + 0.5) - 1 (a position of exactly
# k + 0.5 rounds to the even side, but the draw almost never lands on it); the last
# segment's part beyond L - 1 is clamped onto L - 1.
REFERENCE_TRAIN = {
    16: [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8),
         (8, 9), (9, 10), (10, 11), (11, 12), (12, 13), (13, 14), (14, 15), (15, 15)],
    20: [(0, 1), (1, 2), (3, 4), (4, 5), (5, 6), (6, 7), (8, 9), (9, 10),
         (10, 11), (11, 12), (13, 14), (14, 15), (15, 16), (16, 17), (18, 19), (19, 19)],
    33: [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14), (14, 16),
         (17, 19), (19, 21), (21, 23), (23, 25), (25, 27), (27, 29), (29, 31), (31, 32)],
    47: [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 21), (21, 23),
         (24, 26), (26, 29), (29, 32), (32, 35), (35, 38), (38, 41), (41, 44), (44, 46)],
    120: [(0, 7), (8, 15), (15, 22), (23, 30), (30, 37), (38, 45), (45, 52), (53, 60),
          (60, 67), (68, 75), (75, 82), (83, 90), (90, 97), (98, 105), (105, 112), (113, 119)],
}


@pytest.mark.parametrize("length", sorted(REFERENCE_EVAL))
def test_reference_segment_eval_matches_the_reference(length):
    for num_clips, expected in REFERENCE_EVAL[length].items():
        got = sampling.reference_segment_eval_indices(length, 16, num_clips)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=f"{num_clips} clips")


@pytest.mark.parametrize("length", sorted(REFERENCE_TRAIN))
def test_reference_segment_train_stays_in_and_reaches_both_ends(length):
    rng = np.random.default_rng(3)
    draws = np.stack([sampling.reference_segment_train_indices(length, 16, rng) for _ in range(3000)])  # [3000, 16]
    assert draws.dtype == np.int64
    got = [(int(lo), int(hi)) for lo, hi in zip(draws.min(0), draws.max(0))]
    assert got == REFERENCE_TRAIN[length]
    for i, (lo, hi) in enumerate(REFERENCE_TRAIN[length]):
        assert set(draws[:, i].tolist()) == set(range(lo, hi + 1)), f"segment {i}"


def test_reference_segment_rounds_half_to_even_and_short_videos():
    # L = 4, T = 8: segments half a frame long, centres at 0.25, 0.75, ... 3.75.
    np.testing.assert_array_equal(sampling.reference_segment_eval_indices(4, 8, 1), [[0, 1, 1, 2, 2, 3, 3, 3]])
    # Starts 0, 0.5, 1.0, ... 3.5: the halves go to the even frame (0.5 -> 0, 1.5 -> 2,
    # 2.5 -> 2; 3.5 is clamped to 3 first); ends 0.5 ... 4.0 likewise.
    np.testing.assert_array_equal(
        sampling.reference_segment_eval_indices(4, 8, 2), [[0, 0, 1, 2, 2, 2, 3, 3], [0, 1, 2, 2, 2, 3, 3, 3]]
    )
    np.testing.assert_array_equal(sampling.reference_segment_eval_indices(1, 4, 2), np.zeros((2, 4)))
    rng = np.random.default_rng(0)
    for length in (1, 2, 3, 7):
        idx = sampling.reference_segment_train_indices(length, 16, rng)
        assert idx.shape == (16,) and idx.min() >= 0 and idx.max() <= length - 1
        assert np.all(np.diff(idx) >= 0)


def test_segment_rule_dispatch():
    rng = np.random.default_rng(0)
    reference = ClipConfig(sampling="segment", segment_rule="reference", num_frames=16)
    np.testing.assert_array_equal(sampling.eval_indices(reference, 33, 12.0, 2), REFERENCE_EVAL[33][2])
    np.testing.assert_array_equal(
        sampling.train_indices(reference, 47, 12.0, np.random.default_rng(7)),
        sampling.reference_segment_train_indices(47, 16, np.random.default_rng(7)),
    )
    # The default keeps marscale's own rule.
    default = ClipConfig(sampling="segment", num_frames=4)
    assert default.segment_rule == "marscale"
    np.testing.assert_array_equal(sampling.eval_indices(default, 33, 12.0, 2), [[2, 10, 18, 26], [6, 14, 22, 30]])
    assert sampling.train_indices(default, 33, 12.0, rng).shape == (4,)


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
        (dict(segment_rule="reference"), "segment_rule places segments only"),
        (dict(sampling="segment", segment_rule="linspace"), "'marscale', 'reference'"),
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
