"""Check, probe and re-encode one encoded video, all in memory (PyAV).

- `container_truncation`: whether an MP4/MOV or Matroska/WebM file is cut short, read
  from the container's own box and element sizes;
- `probe_video`: decode every frame; raise `SkipVideo` (with a reason the converter
  reports) when the video is not whole;
- `reader_error`: whether one of the training loader's decoders (`marscale.data.decode`)
  reads the video: PyAV decoding it says little about decord, which fails on some
  inputs PyAV reads (frames 16, 24, 48 or 72 pixels wide);
- `reencode_video`: H.264 at a smaller short side and a fixed keyframe interval;
- `x264_options`: the encoder settings that keep x264's bytes reproducible, shared by
  the re-encoder and the synthetic set's encoder (`synth.encode_video`).

The frame rate of a stream comes from the library's rule,
`marscale.data.decode.stream_frame_rate`, so what a shard's meta record states is
what the loader's PyAV reader uses.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction

import av
import numpy as np

from marscale.data.decode import open_video, stream_frame_rate

# x264's macroblock-tree rate control gives run-to-run different bytes on small frames
# (64x64 and below), even single-threaded; without it the output is reproducible.
X264_PARAMS = "mbtree=0"

# Re-encoding quality: x264's constant rate factor (lower is better and larger).
REENCODE_CRF = 20

# Frames that may be missing against the container's declared length before a file
# counts as truncated: audio tracks and edit lists make the declared length a little
# longer than the video in healthy files.
_TRUNCATION_TOLERANCE = 0.05


@dataclasses.dataclass
class VideoInfo:
    """What probing found: the frames that decode, the stream's rate, the first frame's size."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class SkipVideo(Exception):
    """A video that cannot be used; `reason` is one of `convert.SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_MP4_TOP_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"styp"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MKV_SEGMENT = b"\x18\x53\x80\x67"


def _ebml_vint(data: bytes, pos: int) -> tuple[int, int, bool] | None:
    """(value, length, is_unknown_size) of the EBML variable-size integer at `pos`."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 8 - data[pos].bit_length() + 1
    if pos + length > len(data):
        return None
    value = data[pos] & ((1 << (8 - length)) - 1)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def container_truncation(data: bytes) -> str | None:
    """Why an MP4/MOV or Matroska/WebM file is cut short, or None if its framing is whole.

    Decoders often stop quietly at a cut: they drop the incomplete last frame, or fail to
    open an MP4 whose index is at the end. The container's own sizes tell for sure: an
    MP4 top-level box, or a Matroska Segment of known size, that ends past the file end.
    Other containers (and live-written Matroska of unknown size) return None.
    """
    n = len(data)
    if data[4:8] in _MP4_TOP_BOXES:
        pos = 0
        while pos < n:
            if pos + 8 > n:
                if not any(data[pos:]):  # a few bytes of zero padding after the last box
                    return None
                return f"MP4 box header cut at byte {pos} of {n}"
            size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
            if size == 1:
                if pos + 16 > n:
                    return f"MP4 box header cut at byte {pos} of {n}"
                size = int.from_bytes(data[pos + 8 : pos + 16], "big")
            elif size == 0:  # the last box runs to the end of the file
                return None
            if size < 8:
                return None  # not MP4 framing after all: leave it to the decoder
            if pos + size > n:
                return f"MP4 box {kind.decode('latin-1')!r} needs {pos + size} bytes, file has {n}"
            pos += size
        return None
    if data[:4] == _EBML_MAGIC:
        header = _ebml_vint(data, 4)
        if header is None:
            return f"Matroska header cut ({n} bytes)"
        pos = 4 + header[1] + header[0]
        if data[pos : pos + 4] != _MKV_SEGMENT:
            return None if pos + 4 <= n else f"Matroska file ends before its Segment ({n} bytes)"
        segment = _ebml_vint(data, pos + 4)
        if segment is None:
            return f"Matroska Segment header cut ({n} bytes)"
        size, length, unknown = segment
        end = pos + 4 + length + size
        if not unknown and end > n:
            return f"Matroska Segment needs {end} bytes, file has {n}"
    return None


def x264_options(crf: int) -> dict[str, str]:
    """libx264 options (for `add_stream(options=...)`) whose output bytes are reproducible.

    One encoder thread: x264 output depends on its thread count, and the option has to be
    passed to the encoder itself (PyAV's codec_context.thread_count is not enough).
    Callers get their parallelism from worker processes instead.
    """
    return {"preset": "veryfast", "crf": str(crf), "threads": "1", "x264-params": X264_PARAMS}


def probe_video(data: bytes) -> VideoInfo:
    """Decode every frame of an encoded video; raise `SkipVideo` when it is not whole."""
    cut = container_truncation(data)
    if cut:
        raise SkipVideo("truncated", cut)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, EOFError, OSError, ValueError) as e:
        raise SkipVideo("unreadable", str(e)) from None
    with container:
        if not container.streams.video:
            raise SkipVideo("no_video_stream")
        stream = container.streams.video[0]
        rate = stream_frame_rate(stream)
        fps = float(rate) if rate else 0.0
        declared = float(stream.frames or 0)
        if not declared and fps:
            if stream.duration is not None and stream.time_base is not None:
                declared = float(stream.duration * stream.time_base) * fps
            elif container.duration is not None:
                declared = container.duration / av.time_base * fps
        num_frames, width, height = 0, 0, 0
        try:
            for frame in container.decode(stream):
                if num_frames == 0:
                    width, height = frame.width, frame.height
                num_frames += 1
        except (av.FFmpegError, EOFError, OSError, ValueError) as e:
            raise SkipVideo("decode_error", f"after {num_frames} frames: {e}") from None
        if num_frames == 0:
            raise SkipVideo("no_frames")
        if declared - num_frames > max(1.0, _TRUNCATION_TOLERANCE * declared):
            raise SkipVideo("truncated", f"{num_frames} of {declared:.0f} declared frames decode")
        return VideoInfo(num_frames, fps, width, height, stream.codec_context.name)


def reader_error(data: bytes, decoder: str) -> str | None:
    """Why the loader's `decoder` (decord, pyav, torchcodec) cannot read `data`, or None.

    Opens the video as the loader does and decodes its first, middle and last frames: a
    decoder that fails on a video's format fails on every read of it.
    """
    reader = None
    try:
        reader = open_video(data, decoder)
        last = reader.num_frames - 1
        reader.get_frames(np.unique([0, last // 2, last]))
    except Exception as e:  # noqa: BLE001 - any failure of the reader is the answer, reported by the caller
        return str(e) or type(e).__name__
    finally:
        if reader is not None:
            reader.close()
    return None


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is at most `short_side`, keeping the aspect; even sizes."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def reencode_video(data: bytes, short_side: int, keyframe_interval: int) -> bytes:
    """Decode `data` and encode it again: H.264 (libx264, yuv420p) in MP4, smaller short side.

    Frames stream through one at a time, so long high-resolution videos fit in memory.
    """
    out = io.BytesIO()
    with av.open(io.BytesIO(data), mode="r") as src, av.open(out, mode="w", format="mp4") as dst:
        in_stream = src.streams.video[0]
        rate = (stream_frame_rate(in_stream) or Fraction(30)).limit_denominator(1001)
        width, height = _scaled_size(in_stream.codec_context.width, in_stream.codec_context.height, short_side)
        stream = dst.add_stream("libx264", rate=rate, options=x264_options(REENCODE_CRF))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        frame_time = 1 / Fraction(rate)
        for i, frame in enumerate(src.decode(in_stream)):
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            # Number frames at the constant output rate (source timestamps may be variable).
            scaled.pts, scaled.time_base = i, frame_time
            for packet in stream.encode(scaled):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out.getvalue()
