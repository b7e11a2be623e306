"""Which source frames a clip is made of: pure functions of lengths and a numpy Generator.

Every function returns int64 frame indices in ``[0, num_video_frames - 1]``; training
functions return shape [T], evaluation functions [num_clips, T] (clip k, frame t).
Videos shorter than a clip are handled by clamping to the last frame (the last frame
repeats), so the output length is always T.

Two schemes, as in VideoMAE / MAR:

* dense (Kinetics): T frames `interval` apart, a window of ``(T - 1) * interval + 1``
  source frames. Training draws the window start uniformly; evaluation takes
  `num_clips` evenly spaced windows from the first to the last possible start (one
  window: the centred one). Frame rate is ignored, as in the reference code.
* segment (Something-Something v2): the video is cut into T equal segments and one
  frame is taken from each; segment i spans ``[round(s * i), round(s * (i + 1))]`` with
  ``s = (num_video_frames - 1) / T``. Training picks uniformly inside each segment,
  evaluation clip k takes the point ``(k + 0.5) / num_clips`` of the way through each
  segment (one clip: the centre).
"""

from __future__ import annotations

import numpy as np


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


def train_indices(
    sampling: str, num_video_frames: int, num_frames: int, interval: int, rng: np.random.Generator
) -> np.ndarray:
    """[T] training indices for `sampling` ("dense" or "segment")."""
    if sampling == "dense":
        return dense_train_indices(num_video_frames, num_frames, interval, rng)
    if sampling == "segment":
        return segment_train_indices(num_video_frames, num_frames, rng)
    raise ValueError(f"unknown sampling {sampling!r}: use 'dense' or 'segment'")


def eval_indices(sampling: str, num_video_frames: int, num_frames: int, interval: int, num_clips: int) -> np.ndarray:
    """[num_clips, T] evaluation indices for `sampling` ("dense" or "segment")."""
    if sampling == "dense":
        return dense_eval_indices(num_video_frames, num_frames, interval, num_clips)
    if sampling == "segment":
        return segment_eval_indices(num_video_frames, num_frames, num_clips)
    raise ValueError(f"unknown sampling {sampling!r}: use 'dense' or 'segment'")
