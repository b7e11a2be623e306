"""Which source frames a clip is made of: pure functions of lengths and a numpy Generator.

Every function returns int64 frame indices in ``[0, num_video_frames - 1]``; training
functions return shape [T], evaluation functions [num_clips, T] (clip k, frame t).
Videos shorter than a clip are handled by clamping to the last frame (the last frame
repeats), so the output length is always T.

Two schemes, as in VideoMAE / MAR, each in two forms (`clip.sampling_fps`,
`clip.segment_rule`):

* dense (Kinetics), fixed interval (``sampling_fps`` None): T frames `interval` apart, a
  window of ``(T - 1) * interval + 1`` source frames. Training draws the window start
  uniformly; evaluation takes `num_clips` evenly spaced windows from the first to the
  last possible start (one window: the centred one). Frame rate is ignored (VideoMAE).
* dense, scaled by frame rate (the MAR reference, `_interval_based_sampling` in its
  `dataset/base/base_dataset.py` with ``TARGET_FPS: 30`` and ``MINUS_INTERVAL: false``):
  the window is ``length = T * interval * video_fps / sampling_fps`` source frames (a
  float: 64 at 30 fps for 16 x 4, 53.3 at 25 fps), its start ``s`` is a float, and the
  indices are ``trunc(linspace(s, s + length - 1, T))`` clamped to the video (so the
  first and last index are 63 frames apart at 30 fps, 52 or 53 at 25 fps). With
  ``last = max(num_video_frames - length, 0)``: training draws ``s`` uniformly in
  ``[0, last]``; evaluation clip k of n starts at ``k * floor(last / (n - 1))`` (one
  clip: ``last / 2``). The reference computes the linspace in float32 (torch); float64
  here gave the same evaluation indices in a check at 12.5 to 60 fps. The video's fps
  and frame count are the reader's (`reader.fps`, `reader.num_frames`), which come from
  the sample's frame table (`marscale.data.frames`): frames counted by a full decode,
  the rate measured on their timestamps ((N - 1) / (last - first)), the same for every
  decoder. (Shards written before frame tables use the record's count and the
  container's average rate.) A variable-frame-rate video is sampled by frame index at
  its average rate.
* segment (Something-Something v2): the video is cut into T equal segments and one
  frame is taken from each, by one of two rules (`clip.segment_rule`):

  - "marscale": segment i spans ``[round(s * i), round(s * (i + 1))]`` with
    ``s = (num_video_frames - 1) / T`` (bounds inclusive). Training picks uniformly among
    the frames of each segment; evaluation clip k of n takes the point ``(k + 0.5) / n``
    of the way through each segment, floored (one clip: the centre), so no view sits on
    a segment's end.
  - "reference" (the MAR reference, `_segment_based_sampling` in its
    `dataset/base/base_dataset.py`): segment i spans ``[L * i / T, L * (i + 1) / T]``
    (``linspace(0, L, T + 1)``, L = num_video_frames). Training draws a real position
    uniformly inside each segment; evaluation takes each segment's centre for one clip,
    and for n > 1 clips places clip k at ``k / (n - 1)`` of the way through each segment
    (clip 0 on the segment's start, clip n - 1 on its end, which is the next segment's
    start). Every position is clamped to ``L - 1`` and rounded half to even
    (torch.round in the reference), so a segment's first frame can be its
    predecessor's last. The evaluation positions are computed exactly (integers here);
    the reference's float32 gives the same indices whenever T is a power of two (every
    value is exact then, as for the presets' 16 frames); for other T a position exactly
    halfway between two frames can round the other way there, depending on its CPU's
    vector width.
"""

from __future__ import annotations

import math

import numpy as np

from marscale.core.clip import ClipConfig


class FrameRateError(ValueError):
    """`clip.sampling_fps` is set and the video has no usable frame rate (the loader skips it)."""


def _check(num_video_frames: int, num_frames: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")


def dense_span(num_frames: int, interval: int) -> int:
    """Source frames covered by one dense clip: (T - 1) * interval + 1."""
    return (num_frames - 1) * interval + 1


def _dense_from_start(start: int | np.ndarray, num_video_frames: int, num_frames: int, interval: int) -> np.ndarray:
    offsets = np.arange(num_frames, dtype=np.int64) * interval
    return np.minimum(np.asarray(start, dtype=np.int64)[..., None] + offsets, num_video_frames - 1)


def dense_train_indices(
    num_video_frames: int, num_frames: int, interval: int, rng: np.random.Generator
) -> np.ndarray:
    """[T] indices of a dense clip with a uniformly drawn start."""
    _check(num_video_frames, num_frames)
    last_start = max(num_video_frames - dense_span(num_frames, interval), 0)
    start = int(rng.integers(0, last_start + 1))
    return _dense_from_start(start, num_video_frames, num_frames, interval)


def dense_eval_indices(num_video_frames: int, num_frames: int, interval: int, num_clips: int) -> np.ndarray:
    """[num_clips, T] indices of evenly spaced dense windows (one clip: centred)."""
    _check(num_video_frames, num_frames)
    last_start = max(num_video_frames - dense_span(num_frames, interval), 0)
    if num_clips == 1:
        starts = np.array([last_start // 2])
    else:
        starts = (np.arange(num_clips) * last_start) // (num_clips - 1)
    return _dense_from_start(starts, num_video_frames, num_frames, interval)


def scaled_dense_length(num_frames: int, interval: int, fps_ratio: float) -> float:
    """Source frames of one frame-rate-scaled dense window: T * interval * video_fps / sampling_fps."""
    return num_frames * interval * fps_ratio


def _scaled_dense_from_start(
    start: float | np.ndarray, length: float, num_video_frames: int, num_frames: int
) -> np.ndarray:
    start = np.asarray(start, dtype=np.float64)[..., None]
    steps = np.linspace(0.0, length - 1, num_frames)
    # Truncation toward zero, as torch's .long() in the reference (all values are >= 0).
    return np.clip(start + steps, 0, num_video_frames - 1).astype(np.int64)


def scaled_dense_train_indices(
    num_video_frames: int, num_frames: int, interval: int, fps_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """[T] indices of a frame-rate-scaled dense clip (`fps_ratio` = video fps / sampling fps)
    whose float start is drawn uniformly."""
    _check(num_video_frames, num_frames)
    length = scaled_dense_length(num_frames, interval, fps_ratio)
    start = rng.uniform(0.0, max(num_video_frames - length, 0.0))
    return _scaled_dense_from_start(start, length, num_video_frames, num_frames)


def scaled_dense_eval_indices(
    num_video_frames: int, num_frames: int, interval: int, fps_ratio: float, num_clips: int
) -> np.ndarray:
    """[num_clips, T] indices of frame-rate-scaled dense windows, placed as the reference does."""
    _check(num_video_frames, num_frames)
    length = scaled_dense_length(num_frames, interval, fps_ratio)
    last_start = max(num_video_frames - length, 0.0)
    if num_clips == 1:
        starts = np.array([last_start / 2])
    else:
        starts = np.arange(num_clips) * math.floor(last_start / (num_clips - 1))
    return _scaled_dense_from_start(starts, length, num_video_frames, num_frames)


def _segment_bounds(num_video_frames: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    size = (num_video_frames - 1) / num_frames
    i = np.arange(num_frames)
    return np.round(size * i).astype(np.int64), np.round(size * (i + 1)).astype(np.int64)


def segment_train_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """[T] indices, one uniformly drawn from each of T equal segments (bounds inclusive)."""
    _check(num_video_frames, num_frames)
    lo, hi = _segment_bounds(num_video_frames, num_frames)
    return rng.integers(lo, hi + 1).astype(np.int64)


def segment_eval_indices(num_video_frames: int, num_frames: int, num_clips: int) -> np.ndarray:
    """[num_clips, T] indices; clip k sits (k + 0.5) / num_clips of the way into each segment."""
    _check(num_video_frames, num_frames)
    lo, hi = _segment_bounds(num_video_frames, num_frames)
    where = (np.arange(num_clips) + 0.5) / num_clips
    return (lo + np.floor((hi - lo) * where[:, None])).astype(np.int64)


def _reference_edges(num_video_frames: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """[T] real start and end of each segment: linspace(0, L, T + 1) cut into pairs."""
    edges = np.linspace(0.0, num_video_frames, num_frames + 1)
    return edges[:-1], edges[1:]


def reference_segment_train_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """[T] indices as the MAR reference draws them: a real position uniform in each segment
    ``[L * i / T, L * (i + 1) / T)``, clamped to L - 1 and rounded half to even."""
    _check(num_video_frames, num_frames)
    lo, hi = _reference_edges(num_video_frames, num_frames)
    position = lo + (hi - lo) * rng.random(num_frames)
    return np.round(np.minimum(position, num_video_frames - 1)).astype(np.int64)


def _round_half_even(num: np.ndarray, den: int) -> np.ndarray:
    """round(num / den) for integers num >= 0, den > 0, ties to the even integer (as np.round)."""
    q, r = np.divmod(num, den)
    return q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))


def reference_segment_eval_indices(num_video_frames: int, num_frames: int, num_clips: int) -> np.ndarray:
    """[num_clips, T] indices as the MAR reference places its test views: one clip at each
    segment's centre; n > 1 clips with clip k at k / (n - 1) of the way through each segment.

    Position of clip k in segment i: ``L * (i * q + p) / (T * q)`` with p / q = 1 / 2 for
    one clip and k / (n - 1) otherwise, rounded half to even in integers (exactly), then
    clamped to L - 1 (rounding and clamping commute: L - 1 is a whole frame).
    """
    _check(num_video_frames, num_frames)
    if num_clips == 1:
        p, q = np.array([1]), 2
    else:
        p, q = np.arange(num_clips), num_clips - 1
    i = np.arange(num_frames, dtype=np.int64)
    num = num_video_frames * (i[None, :] * q + p[:, None])  # [num_clips, T]
    return np.minimum(_round_half_even(num, num_frames * q), num_video_frames - 1).astype(np.int64)


def _fps_ratio(clip: ClipConfig, video_fps: float) -> float:
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise FrameRateError(f"clip.sampling_fps needs the video's frame rate; the decoder reports {video_fps}")
    return video_fps / clip.sampling_fps


def train_indices(clip: ClipConfig, num_video_frames: int, video_fps: float, rng: np.random.Generator) -> np.ndarray:
    """[T] training indices of one window as `clip` samples it (`video_fps` is read only
    when `clip.sampling_fps` is set)."""
    if clip.sampling == "segment" and clip.segment_rule == "reference":
        return reference_segment_train_indices(num_video_frames, clip.num_frames, rng)
    if clip.sampling == "segment":
        return segment_train_indices(num_video_frames, clip.num_frames, rng)
    if clip.sampling_fps is None:
        return dense_train_indices(num_video_frames, clip.num_frames, clip.sampling_interval, rng)
    ratio = _fps_ratio(clip, video_fps)
    return scaled_dense_train_indices(num_video_frames, clip.num_frames, clip.sampling_interval, ratio, rng)


def eval_indices(clip: ClipConfig, num_video_frames: int, video_fps: float, num_clips: int) -> np.ndarray:
    """[num_clips, T] evaluation indices as `clip` samples them (same rule as `train_indices`)."""
    if clip.sampling == "segment" and clip.segment_rule == "reference":
        return reference_segment_eval_indices(num_video_frames, clip.num_frames, num_clips)
    if clip.sampling == "segment":
        return segment_eval_indices(num_video_frames, clip.num_frames, num_clips)
    if clip.sampling_fps is None:
        return dense_eval_indices(num_video_frames, clip.num_frames, clip.sampling_interval, num_clips)
    ratio = _fps_ratio(clip, video_fps)
    return scaled_dense_eval_indices(num_video_frames, clip.num_frames, clip.sampling_interval, ratio, num_clips)
