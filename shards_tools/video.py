"""Check, probe and re-encode one encoded video, all in memory (PyAV).

- `container_truncation`: whether an MP4/MOV or Matroska/WebM file is cut short, read
  from the container's own box and element sizes;
- `probe_video`: decode every frame (`marscale.data.frames.scan_video`: the frame
  table, rotation, pixel aspect); raise `SkipVideo` (with a reason the converter
  reports) when the video is not whole;
- `exact_decoders`: which of the training loader's decoders (`marscale.data.decode`)
  return the sequential decode's frames at sampled indices: PyAV decoding a video says
  little about decord, which fails on some inputs PyAV reads (frames 16, 24, 48 or 72
  pixels wide) and returns wrong frames on others (AVI with B-frames, MPEG program
  streams, ASF);
- `reencode_video`: H.264 at a smaller short side and a fixed keyframe interval, in
  display orientation and with square pixels;
- `x264_options`: the encoder settings that keep x264's bytes reproducible, shared by
  the re-encoder and the synthetic set's encoder (`synth.encode_video`).

Frame numbers, counts and rates follow the library's definition
(`marscale.data.frames`), so what a shard's record states is what every reader returns.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction
from functools import partial

import av

from marscale.data.decode import available_decoders, open_video, random_access_error, spot_check_indices
from marscale.data.frames import (
    DecodeError,
    VideoScan,
    decoded_frames,
    display_rgb,
    rotation_quarters,
    scan_video,
    sequential_frames,
)

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
    """What probing found: the full sequential decode's frame index and the stream's facts."""

    scan: VideoScan

    @property
    def num_frames(self) -> int:
        return self.scan.index.num_frames

    @property
    def fps(self) -> float:
        return self.scan.index.fps

    @property
    def width(self) -> int:
        return self.scan.width

    @property
    def height(self) -> int:
        return self.scan.height

    @property
    def codec(self) -> str:
        return self.scan.codec

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
        scan = scan_video(data)
    except DecodeError as e:
        raise SkipVideo(e.reason, str(e)) from None
    declared, num_frames = scan.declared_frames, scan.index.num_frames
    if declared:
        if declared - num_frames > max(1.0, _TRUNCATION_TOLERANCE * declared):
            raise SkipVideo("truncated", f"{num_frames} of {declared} declared frames decode")
    elif scan.declared_seconds and scan.index.fps:
        # No stated frame count (WebM, Ogg, MPEG streams): compare durations, which also
        # holds for variable frame rates and repeated-frame (empty) packets.
        seconds = scan.decoded_seconds or num_frames / scan.index.fps
        missing = scan.declared_seconds - seconds
        if missing > max(1.0 / scan.index.fps, _TRUNCATION_TOLERANCE * scan.declared_seconds):
            raise SkipVideo("truncated", f"frames for {seconds:.2f} s of {scan.declared_seconds:.2f} s decode")
    return VideoInfo(scan)


# Decoders never trusted on a container, whatever the spot check finds: decord's random
# access on AVI depends on the index and B-frame layout, and was seen exact on every frame of
# a short file yet wrong on a longer one of the same kind. A spot check samples frames; this
# rule closes what it could miss (such files are re-encoded, or read with PyAV).
UNTRUSTED = {"decord": ("avi",)}


def exact_decoders(data: bytes, info: VideoInfo, decoders: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(decoders whose random access returns the sequential decode's frames, {decoder:
    why not} for the others), checked on `spot_check_indices` of the video.

    decoders: those to check (default: every one installed here).
    """
    index = info.scan.index
    container = info.scan.container.lower()
    indices = spot_check_indices(index)
    try:
        reference = sequential_frames(data, indices)
    except DecodeError as e:
        return [], {name: f"no reference frames: {e}" for name in decoders or available_decoders()}
    exact, errors = [], {}
    for name in decoders if decoders is not None else available_decoders():
        error = random_access_error(partial(open_video, data, name, index), index, reference)
        untrusted = [c for c in UNTRUSTED.get(name, ()) if c in container.split(",")]
        if error is None and untrusted:
            error = f"{name} is not trusted for random access in {untrusted[0].upper()} files (exact on the sampled frames)"
        if error is None:
            exact.append(name)
        else:
            errors[name] = error
    return exact, errors


def square_display_size(scan: VideoScan) -> tuple[float, float]:
    """(width, height) of the video shown with square pixels, in display orientation."""
    quarters = scan.rotation // 90
    stored_w, stored_h = (scan.height, scan.width) if quarters % 2 else (scan.width, scan.height)
    width, height = stored_w * float(scan.pixel_aspect), float(stored_h)
    return (height, width) if quarters % 2 else (width, height)


def _scaled_size(width: float, height: float, short_side: int | None) -> tuple[int, int]:
    """Scale so the short side is at most `short_side` (None: as it is), keeping the aspect; even sizes."""
    scale = 1.0 if short_side is None else min(1.0, short_side / min(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def reencode_video(data: bytes, short_side: int | None, keyframe_interval: int, scan: VideoScan | None = None) -> bytes:
    """Decode `data` and encode it again: H.264 (libx264, yuv420p) in MP4.

    The output's frame i is the source's frame i (`marscale.data.frames`) turned to its
    display orientation and resampled to square pixels, scaled so the short side is at
    most `short_side` (None: the source's own size), at a constant rate (the source's
    measured one: variable frame timing is not kept). Frames stream through one at a
    time, so long high-resolution videos fit in memory.
    """
    scan = scan or scan_video(data)
    rate = Fraction(scan.index.fps or 30).limit_denominator(1001)
    width, height = _scaled_size(*square_display_size(scan), short_side)
    out = io.BytesIO()
    with av.open(io.BytesIO(data), mode="r") as src, av.open(out, mode="w", format="mp4") as dst:
        in_stream = src.streams.video[0]
        in_stream.codec_context.thread_count = 1
        stream = dst.add_stream("libx264", rate=rate, options=x264_options(REENCODE_CRF))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        frame_time = 1 / rate
        for i, frame in enumerate(decoded_frames(src, in_stream)):
            if rotation_quarters(frame):
                frame = av.VideoFrame.from_ndarray(display_rgb(frame), format="rgb24")
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            # Number frames at the constant output rate (source timestamps may be variable).
            scaled.pts, scaled.time_base = i, frame_time
            for packet in stream.encode(scaled):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out.getvalue()
