"""Decode frames from in-memory video bytes with decord, PyAV or torchcodec.

All backends share one interface::

    reader = open_video(data, "decord")        # parses the container, nothing decoded yet
    reader.num_frames, reader.fps
    frames = reader.get_frames(indices)         # uint8 numpy [len(indices), H, W, 3] RGB
    reader.close()

Readers are made inside the loader's worker processes, per sample, and closed right
after use: decord hangs when a reader exists in the parent process before the workers
fork, and long-lived decord readers grow in memory on some inputs. Every backend decodes
single-threaded, because parallelism comes from the loader's worker processes.

Anything wrong with the bytes (not a video, truncated, no video stream, an undecodable
frame) raises `DecodeError`, which the pipeline counts and skips.

`available_decoders()` lists the importable backends; "auto" picks the first available
one of `AUTO_ORDER`. decord comes first: in `benchmarks/bench_loader.py` (one dense
16-frame clip from 10-second 320x240 H.264, single-threaded) decord and PyAV cost the
same CPU time within run-to-run noise (about 55-62 ms a clip with one keyframe per video,
31-38 ms with a keyframe every 16 frames), and decord is what VideoMAE/MAR used.
torchcodec comes last: it could not be benchmarked here (its PyPI wheel needs CUDA).
"""

from __future__ import annotations

import importlib.util
import io
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

AUTO_ORDER = ("decord", "pyav", "torchcodec")
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}


class DecodeError(RuntimeError):
    """The bytes could not be decoded as a video (the sample is skipped)."""


class VideoReader(Protocol):
    num_frames: int
    fps: float

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] RGB frames; indices may repeat and be unsorted."""

    def close(self) -> None: ...


def available_decoders() -> list[str]:
    """Backends whose Python package can be imported here, in `AUTO_ORDER`."""
    return [name for name in AUTO_ORDER if importlib.util.find_spec(_MODULES[name]) is not None]


def resolve_decoder(name: str) -> str:
    """Map "auto" to the preferred available backend; check that `name` is installed."""
    available = available_decoders()
    if name == "auto":
        if not available:
            raise RuntimeError("no video decoder installed: pip install decord (or av, or torchcodec)")
        return available[0]
    if name not in _MODULES:
        raise ValueError(f"unknown decoder {name!r}: use auto, {', '.join(AUTO_ORDER)}")
    if name not in available:
        raise RuntimeError(
            f"decoder {name!r} is not installed (pip install {_MODULES[name]}); installed: {available or 'none'}"
        )
    return name


def open_video(data: bytes, backend: str) -> VideoReader:
    """A reader over `data` (encoded video bytes) with backend decord | pyav | torchcodec."""
    if not data:
        raise DecodeError("empty video bytes")
    opener = {"decord": DecordReader, "pyav": PyAVReader, "torchcodec": TorchCodecReader}.get(backend)
    if opener is None:
        raise ValueError(f"unknown decoder {backend!r}: resolve 'auto' with resolve_decoder() first")
    return opener(data)


def stream_frame_rate(stream: Any) -> Fraction | None:
    """Frames per second of a PyAV video stream, or None when the container does not say.

    The one rule for `PyAVReader` and for the shard tools (probe, re-encode), so the fps a
    shard's meta record states is the fps the reader samples with. The average rate comes
    first: it is the rate over the whole stream, and the one decord (get_avg_fps) and
    torchcodec (average_fps) report. Without it, `guessed_rate` is FFmpeg's
    av_guess_frame_rate, which starts from `base_rate` (r_frame_rate) and replaces it only
    with another valid rate: `base_rate` is never set when `guessed_rate` is not, so it
    would add nothing as a third choice.
    """
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


def _unique_sorted(indices: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct wanted frames in order, and where each requested index is among them."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("no frame indices requested")
    if indices.min() < 0 or indices.max() >= num_frames:
        raise IndexError(f"frame indices must be in [0, {num_frames - 1}], got {indices.min()}..{indices.max()}")
    return np.unique(indices, return_inverse=True)


class DecordReader:
    def __init__(self, data: bytes):
        import decord

        try:
            self._reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except (RuntimeError, decord.DECORDError) as e:
            raise DecodeError(f"decord cannot open the video: {_first_line(e)}") from e
        if self.num_frames < 1:
            raise DecodeError("decord found no frames")

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        import decord

        wanted, where = _unique_sorted(indices, self.num_frames)
        try:
            frames = self._reader.get_batch(wanted.tolist()).asnumpy()
        except (RuntimeError, decord.DECORDError) as e:
            raise DecodeError(f"decord cannot decode frames {wanted.tolist()}: {_first_line(e)}") from e
        return frames[where]

    def close(self) -> None:
        self._reader = None


class PyAVReader:
    """Seek to the keyframe before the first wanted frame, then decode forward.

    Frame numbers come from presentation timestamps (``(pts - start) * time_base * fps``),
    which is exact for constant-frame-rate video, the kind the shard converter writes.
    """

    def __init__(self, data: bytes):
        import av

        try:
            self._container = av.open(io.BytesIO(data), mode="r")
            if not self._container.streams.video:
                raise DecodeError("no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = 1
            rate = stream_frame_rate(self._stream)
            if rate is None:
                raise DecodeError("unknown frame rate")
            self.fps = float(rate)
            self.num_frames = int(self._stream.frames) or self._frames_from_duration()
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV cannot open the video: {e}") from e
        if self.num_frames < 1:
            raise DecodeError("PyAV found no frames")
        self._start_pts = self._stream.start_time or 0

    def _frames_from_duration(self) -> int:
        # Containers without a frame count (often WebM): estimate from the duration.
        if self._stream.duration is not None:
            seconds = float(self._stream.duration * self._stream.time_base)
        elif self._container.duration is not None:
            seconds = self._container.duration / 1_000_000  # av.time_base is microseconds
        else:
            return 0
        return int(round(seconds * self.fps))

    def _frame_number(self, frame) -> int:
        return int(round(float((frame.pts - self._start_pts) * self._stream.time_base) * self.fps))

    def _decode_from(self, first: int, last: int, wanted: set[int], seek: bool) -> dict[int, np.ndarray]:
        import av

        if seek and first > 0:
            target = self._start_pts + int(first / self.fps / self._stream.time_base)
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        else:
            self._container.seek(self._start_pts, stream=self._stream, backward=True, any_frame=False)
        got: dict[int, np.ndarray] = {}
        try:
            for frame in self._container.decode(self._stream):
                if frame.pts is None:
                    raise DecodeError("frame without a timestamp")
                n = self._frame_number(frame)
                if seek and not got and n > first:
                    return {}  # landed after the first wanted frame: caller decodes from 0
                if n in wanted:
                    got[n] = frame.to_ndarray(format="rgb24")
                if n >= last:
                    break
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV cannot decode: {e}") from e
        return got

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        wanted, where = _unique_sorted(indices, self.num_frames)
        first, last = int(wanted[0]), int(wanted[-1])
        got = self._decode_from(first, last, set(wanted.tolist()), seek=True)
        if first not in got:
            got = self._decode_from(first, last, set(wanted.tolist()), seek=False)
        if not got:
            raise DecodeError(f"PyAV decoded none of frames {first}..{last}")
        # A frame count taken from the container can exceed what really decodes: frames
        # past the real end repeat the last one decoded, as clamped sampling would.
        frames, previous = [], got[min(got)]
        for n in wanted.tolist():
            previous = got.get(n, previous)
            frames.append(previous)
        return np.stack(frames)[where]

    def close(self) -> None:
        self._container.close()


class TorchCodecReader:
    def __init__(self, data: bytes):
        from torchcodec.decoders import VideoDecoder

        try:
            self._decoder = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1, device="cpu")
            meta = self._decoder.metadata
            self.num_frames = int(meta.num_frames or 0)
            self.fps = float(meta.average_fps or 0.0)
        except (RuntimeError, ValueError) as e:
            raise DecodeError(f"torchcodec cannot open the video: {_first_line(e)}") from e
        if self.num_frames < 1:
            raise DecodeError("torchcodec found no frames")

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        wanted, where = _unique_sorted(indices, self.num_frames)
        try:
            frames = self._decoder.get_frames_at(indices=wanted.tolist()).data.numpy()
        except (RuntimeError, ValueError, IndexError) as e:
            raise DecodeError(f"torchcodec cannot decode frames {wanted.tolist()}: {_first_line(e)}") from e
        return frames[where]

    def close(self) -> None:
        self._decoder = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
