"""What "frame i" of a video is, and the per-video frame table the converter records.

**Frame i** of a video is the i-th frame, in presentation order, of a full sequential
decode of its first video stream by FFmpeg (`decoded_frames`), turned to its display
orientation (`display_rgb`). Every reader in `decode.py` (decord, PyAV, torchcodec)
must return exactly these frames for any requested indices; the converter and
`marscale-shards verify` check it per video (`decode.random_access_error`).

The sequential decode skips empty packets, as FFmpeg's own command-line tool does:
Theora (and a few other codecs) store a repeated frame as a zero-byte packet, which
the decoding API would take for the end of the stream. Such a packet gives no frame,
so the frame after it is the next frame number and its timestamp shows the gap, as in
any variable-frame-rate video.

**The frame table** (`FrameIndex`, stored in each sample's JSON record at conversion,
`marscale.data.shards.SampleMeta.frames`): the presentation timestamp of every frame and
which frames are key frames, read from the frames the decode actually gives. Frame
counts and frame rates come from it rather than from the container's header, whose
average rate can be off (30.12 for a true 30 fps MP4) and whose timestamps can start
anywhere (an AVI's first frame at pts 2). A reader maps index -> timestamp with it,
seeks to the key frame at or before, and decodes forward matching timestamps exactly.

The table is stored run-length encoded (`[[first, step, count], ...]`): a
constant-rate video needs one run whatever its length.

**Rotation** is the display matrix's rotation (counter-clockwise degrees, as PyAV's
`VideoFrame.rotation` reads it), rounded to a multiple of 90 (mirroring flips are
not applied): frames are rotated as players show them, which is also what decord does
on its own. **Pixel aspect** (`sample_aspect_ratio`) is recorded, not applied: raw
frames keep the stored pixel grid; the re-encoder resamples to square pixels.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction
from typing import Any, Iterator

import numpy as np


class DecodeError(RuntimeError):
    """The bytes could not be decoded as a video (the sample is skipped).

    `reason` says which way (the converter's skip reasons): "unreadable" (no container
    it can open), "no_video_stream", "no_frames" or "decode_error".
    """

    def __init__(self, message: str, reason: str = "decode_error"):
        super().__init__(message)
        self.reason = reason


def decoded_frames(container: Any, stream: Any) -> Iterator[Any]:
    """The frames of `stream` in presentation order: the one sequential decode.

    Zero-byte packets are skipped (a repeated frame in Theora; the demuxer's own
    end-of-stream marker), and the decoder is flushed once at the end.
    """
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        yield from packet.decode()
    yield from stream.decode(None)


def rotation_quarters(frame: Any) -> int:
    """Counter-clockwise quarter turns that bring a decoded frame to its display orientation."""
    return int(round((frame.rotation or 0) / 90)) % 4


def display_rgb(frame: Any) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a PyAV frame in its display orientation."""
    rgb = frame.to_ndarray(format="rgb24")
    quarters = rotation_quarters(frame)
    return np.ascontiguousarray(np.rot90(rgb, quarters)) if quarters else rgb


def frame_timestamp(frame: Any) -> int | None:
    """A decoded frame's presentation timestamp (stream time base), or None when it has none."""
    return frame.pts if frame.pts is not None else frame.dts


def stream_frame_rate(stream: Any) -> Fraction | None:
    """Frames per second a PyAV video stream's header states, or None when it does not say.

    Only a fallback (for a video whose frames carry no usable timestamps): the rate of a
    scanned video is `FrameIndex.fps`, measured on its frames. The average rate comes
    first; without it, `guessed_rate` (FFmpeg's av_guess_frame_rate from the base rate).
    """
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


def encode_runs(values: np.ndarray) -> list[list[int]]:
    """[[first, step, count], ...]: runs of constant step that rebuild `values` exactly."""
    values = np.asarray(values, dtype=np.int64)
    runs: list[list[int]] = []
    i, n = 0, len(values)
    while i < n:
        if i + 1 == n:
            runs.append([int(values[i]), 0, 1])
            break
        step = int(values[i + 1] - values[i])
        j = i + 1
        while j + 1 < n and values[j + 1] - values[j] == step:
            j += 1
        runs.append([int(values[i]), step, j - i + 1])
        i = j + 1
    return runs


def decode_runs(runs: list[list[int]]) -> np.ndarray:
    """The int64 values `encode_runs` encoded."""
    parts = [first + step * np.arange(count, dtype=np.int64) for first, step, count in runs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """What is known of a video's frames before decoding any: their count, rate and, when
    recorded, every frame's timestamp (a reader's map from index to frame)."""

    num_frames: int
    """Frames of the full sequential decode."""
    fps: float
    """Frames per second: measured from the timestamps when there are some."""
    pts: np.ndarray | None = None
    """int64 [num_frames] presentation timestamps of frames 0..N-1 (strictly increasing),
    or None: not recorded (shards written before frame tables), or the video's frames
    carry no usable timestamps. Without it a reader decodes from the start and counts."""
    time_base: Fraction = Fraction(1)
    """Seconds per timestamp unit."""
    key_frames: np.ndarray | None = None
    """int64 [K] indices of the key frames (where a decode can start), in order."""

    @property
    def timestamps(self) -> np.ndarray | None:
        """float64 [num_frames] seconds of each frame from the first, or None."""
        if self.pts is None:
            return None
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)

    @property
    def variable_rate(self) -> bool:
        """Whether the frames are not evenly spaced in time."""
        return self.pts is not None and len(self.pts) > 2 and len(np.unique(np.diff(self.pts))) > 1

    def to_record(self) -> dict[str, Any] | None:
        """The JSON form stored in a sample record (`SampleMeta.frames`), or None without timestamps."""
        if self.pts is None:
            return None
        return {
            "time_base": str(self.time_base),
            "pts": encode_runs(self.pts),
            "key_frames": encode_runs(self.key_frames if self.key_frames is not None else np.zeros(0)),
        }

    @classmethod
    def from_record(cls, num_frames: int, fps: float, record: dict[str, Any] | None) -> "FrameIndex":
        """The index a sample record describes (`record`: `SampleMeta.frames`, None for
        records written before frame tables). Raises ValueError on an inconsistent table."""
        if record is None:
            return cls(num_frames=num_frames, fps=fps)
        pts = decode_runs(record["pts"])
        key_frames = decode_runs(record["key_frames"])
        time_base = Fraction(record["time_base"])
        if len(pts) != num_frames:
            raise ValueError(f"the frame table lists {len(pts)} frames, the record {num_frames}")
        if len(pts) > 1 and not (np.diff(pts) > 0).all():
            raise ValueError("the frame table's timestamps are not strictly increasing")
        # The rate from the table itself: the record's `fps` is rounded for reading.
        rate = measured_fps(pts, time_base, None)
        return cls(num_frames, float(rate) if rate else fps, pts, time_base, key_frames)


def measured_fps(pts: list[int] | np.ndarray, time_base: Fraction, fallback: Fraction | None) -> Fraction | None:
    """(N - 1) frames over the time from the first to the last frame; `fallback` (the
    header's rate) for a single frame."""
    if len(pts) > 1 and pts[-1] > pts[0]:
        return Fraction(len(pts) - 1) / ((int(pts[-1]) - int(pts[0])) * time_base)
    return fallback


@dataclasses.dataclass
class VideoScan:
    """What one full sequential decode found (`scan_video`)."""

    index: FrameIndex
    width: int
    """Display width: after rotation."""
    height: int
    rotation: int
    """Counter-clockwise degrees applied to reach the display orientation (0, 90, 180, 270)."""
    pixel_aspect: Fraction
    """Sample (pixel) aspect ratio: 1 for square pixels."""
    codec: str
    container: str
    declared_frames: int
    """The frame count the container states (0 if it states none)."""
    declared_seconds: float
    """The stream's (else the container's) stated duration in seconds (0 if none)."""

    @property
    def decoded_seconds(self) -> float:
        """Time the decoded frames cover: first to last timestamp plus one frame (0 if unknown)."""
        stamps = self.index.timestamps
        if stamps is None or not self.index.fps:
            return 0.0
        return float(stamps[-1]) + 1.0 / self.index.fps


def open_container(data: bytes) -> Any:
    """A PyAV input container over encoded bytes."""
    import av

    return av.open(io.BytesIO(data), mode="r")


def scan_video(data: bytes) -> VideoScan:
    """Decode every frame of `data` once (without colour conversion) and record what
    "frame i" means for it. Raises DecodeError (av's error as the cause) when it cannot."""
    import av

    try:
        container = open_container(data)
    except (av.FFmpegError, EOFError, OSError, ValueError) as e:
        raise DecodeError(f"not a readable video container: {e}", "unreadable") from e
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream", "no_video_stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        header_rate = stream_frame_rate(stream)
        if stream.duration is not None and stream.time_base is not None:
            declared_seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            declared_seconds = container.duration / av.time_base
        else:
            declared_seconds = 0.0
        pts: list[int | None] = []
        key_frames: list[int] = []
        first = None
        try:
            for frame in decoded_frames(container, stream):
                if first is None:
                    first = (frame.width, frame.height, rotation_quarters(frame))
                if frame.key_frame:
                    key_frames.append(len(pts))
                pts.append(frame_timestamp(frame))
        except (av.FFmpegError, EOFError, OSError, ValueError) as e:
            raise DecodeError(f"decoding failed after {len(pts)} frames: {e}") from e
        if first is None:
            raise DecodeError("no frame decodes", "no_frames")
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1)
        usable = None not in pts and all(b > a for a, b in zip(pts, pts[1:]))
        table = np.asarray(pts, dtype=np.int64) if usable else None
        fps = measured_fps(table, time_base, header_rate) if table is not None else header_rate
        width, height, quarters = first
        if quarters % 2:
            width, height = height, width
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        index = FrameIndex(
            num_frames=len(pts),
            fps=float(fps) if fps else 0.0,
            pts=table,
            time_base=time_base,
            key_frames=np.asarray(key_frames or [0], dtype=np.int64),
        )
        return VideoScan(
            index=index,
            width=width,
            height=height,
            rotation=90 * quarters,
            pixel_aspect=Fraction(sar) if sar else Fraction(1),
            codec=stream.codec_context.name,
            container=container.format.name,
            declared_frames=int(stream.frames or 0),
            declared_seconds=declared_seconds,
        )


def sequential_frames(data: bytes, indices: np.ndarray) -> dict[int, np.ndarray]:
    """{i: frame i} for the wanted indices, by the sequential decode (the reference every
    reader is checked against). Raises DecodeError if the video ends before them."""
    import av

    wanted = set(int(i) for i in np.asarray(indices).ravel())
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    try:
        with open_container(data) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for n, frame in enumerate(decoded_frames(container, stream)):
                if n in wanted:
                    out[n] = display_rgb(frame)
                if n >= last:
                    break
    except (av.FFmpegError, EOFError, OSError, ValueError, IndexError) as e:
        raise DecodeError(f"sequential decode failed: {e}") from e
    if len(out) != len(wanted):
        raise DecodeError(f"the video ends before frame {last}")
    return out
