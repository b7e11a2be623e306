"""Convert an annotated video dataset into WebDataset shards (`marscale-shards convert`).

Stages, in order:

1. parse the annotations (`annotations.py`) and drop entries that are unusable without
   opening them (unknown label, outside the root, duplicate, missing or empty file);
2. plan: optionally shuffle (seeded), number the samples (key = position), and cut the
   list into shards by sample count or by source bytes. The plan depends only on the
   annotations, the files' sizes and the options, so shard k always holds the same
   samples and a re-run knows what each shard should contain;
3. for every shard not already finished: read, probe (decode every frame with PyAV) and
   optionally re-encode each video in a process pool, then write the shard in the main
   process in plan order under a temporary name and `os.replace` it into place. Output
   bytes do not depend on the number of workers;
4. write ``manifest.json`` atomically.

Progress is recorded in ``.convert-state.json`` (options, a digest of the plan, and the
finished shards with their sha256) after every shard, so re-running the same command after an interruption keeps
the finished shards whose checksum still matches and writes only the rest.

Videos that cannot be used are skipped, never written half-way, and listed in the
manifest's ``skipped`` with a reason (see `SKIP_REASONS`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from fractions import Fraction
from typing import Any, Iterable, Iterator

import av
import numpy as np

from . import annotations as ann
from marscale.io import PARTIAL_SUFFIX, atomic_write_bytes
from marscale.shards import (
    LABEL_EXT,
    META_EXT,
    SHARD_SUFFIX,
    VIDEO_EXTENSIONS,
    Manifest,
    SampleMeta,
    ShardInfo,
    Skipped,
    manifest_path,
    partial_name,
    sample_key,
    save_manifest,
    shard_name,
)
from .synth import X264_PARAMS

log = logging.getLogger(__name__)

STATE_NAME = ".convert-state.json"
DEFAULT_SAMPLES_PER_SHARD = 500

# Why an input was skipped (manifest `skipped[].reason`).
SKIP_REASONS = {
    ann.UNKNOWN_LABEL: "label is not one of the classes",
    ann.OUTSIDE_ROOT: "path leaves the dataset root",
    ann.DUPLICATE: "the same video is listed again",
    "missing": "file does not exist",
    "empty": "file is empty",
    "unsupported_extension": "extension is not a known video container (re-encode to keep it)",
    "unreadable": "not a video container, or cut off before its index",
    "no_video_stream": "container has no video stream",
    "decode_error": "decoding failed part-way",
    "truncated": "file is cut short (container framing or frame count)",
    "no_frames": "no frame decodes",
    "reencode_error": "re-encoding failed",
}

# Frames that may be missing against the container's declared length before a file
# counts as truncated: audio tracks and edit lists make the declared length a little
# longer than the video in healthy files.
_TRUNCATION_TOLERANCE = 0.05

# Tar header plus padding, and the .cls/.json members: used to plan shards by bytes.
_SAMPLE_OVERHEAD_BYTES = 3 * 1024 + 1024


class ConvertError(RuntimeError):
    """The conversion cannot proceed; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how. Everything but `workers` and `out` decides the output."""

    format: str
    """Annotation format: one of annotations.FORMATS."""
    root: str
    """Video root: annotation paths are relative to it."""
    out: str
    """Output folder for the shards and manifest.json."""
    prefix: str
    """Shard names are PREFIX-000000.tar, ..."""
    annotations: str | None = None
    """Annotation file (not used by the folder format)."""
    labels: str | None = None
    """SSv2 something-something-v2-labels.json."""
    classes: str | None = None
    """Kinetics/CSV: class names, one a line (default: classes are named 0..max label)."""
    samples_per_shard: int | None = None
    """Samples per shard (default DEFAULT_SAMPLES_PER_SHARD unless max_shard_bytes is set)."""
    max_shard_bytes: int | None = None
    """Cut shards by size instead: source bytes per shard (a lone larger video gets its own)."""
    shuffle_seed: int | None = None
    """Shuffle the samples before sharding, so each shard mixes classes (None: file order)."""
    reencode: bool = False
    """Re-encode every video with libx264 (short side, keyframe interval below)."""
    short_side: int = 320
    """Re-encoding scales videos whose short side is longer down to this; never up."""
    keyframe_interval: int = 16
    """Re-encoding keyframe interval (GOP) in frames: short GOPs make random seeks cheap."""
    workers: int = 1
    """Processes that read, probe and re-encode videos."""

    def __post_init__(self) -> None:
        if self.format not in ann.FORMATS:
            raise ValueError(f"format {self.format!r} is unknown; choose one of {', '.join(ann.FORMATS)}")
        if self.format != "folder" and not self.annotations:
            raise ValueError(f"format {self.format!r} needs an annotation file (--annotations)")
        if self.format == "ssv2" and not self.labels:
            raise ValueError("format 'ssv2' needs --labels something-something-v2-labels.json")
        if self.samples_per_shard is not None and self.max_shard_bytes is not None:
            raise ValueError("give either samples_per_shard or max_shard_bytes, not both")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.reencode and (self.short_side < 2 or self.keyframe_interval < 1):
            raise ValueError("re-encoding needs short_side >= 2 and keyframe_interval >= 1")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.prefix or "/" in self.prefix or os.sep in self.prefix:
            raise ValueError(f"prefix must be a plain file name part, got {self.prefix!r}")

    def record(self) -> dict[str, Any]:
        """The options that decide the output, as stored in the manifest and state file."""
        out = dataclasses.asdict(self)
        del out["workers"], out["out"]
        for key in ("root", "annotations", "labels", "classes"):
            if out[key]:
                out[key] = os.path.abspath(out[key])
        if out["samples_per_shard"] is None and out["max_shard_bytes"] is None:
            out["samples_per_shard"] = DEFAULT_SAMPLES_PER_SHARD
        if not self.reencode:
            del out["short_side"], out["keyframe_interval"]
        return out


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    index: int  # global position: the sample key
    source: str
    path: str  # relative to the root
    label: int


@dataclasses.dataclass
class ConvertResult:
    manifest: Manifest
    out: str
    shards_written: int
    shards_kept: int
    seconds: float

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.manifest.shards)

    def summary(self) -> str:
        m = self.manifest
        by_reason = collections.Counter(s.reason for s in m.skipped)
        lines = [
            f"{self.out}: {m.num_samples} samples in {len(m.shards)} shards "
            f"({self.shards_written} written, {self.shards_kept} kept), "
            f"{self.num_bytes / 2**20:.1f} MiB, {len(m.class_names)} classes, {self.seconds:.1f} s",
            f"skipped: {len(m.skipped)}" + (":" if m.skipped else ""),
        ]
        for reason, n in sorted(by_reason.items()):
            lines.append(f"  {reason:<22} {n:>7}  ({SKIP_REASONS.get(reason, '')})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- probing


@dataclasses.dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class SkipVideo(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _frame_rate(stream: Any) -> Fraction | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else None


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
        rate = _frame_rate(stream)
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
        rate = (_frame_rate(in_stream) or Fraction(30)).limit_denominator(1001)
        width, height = _scaled_size(in_stream.codec_context.width, in_stream.codec_context.height, short_side)
        # One encoder thread keeps the bytes reproducible (x264 output depends on its thread
        # count); the worker pool gives the parallelism.
        options = {"preset": "veryfast", "crf": "20", "threads": "1", "x264-params": X264_PARAMS}
        stream = dst.add_stream("libx264", rate=rate, options=options)
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


@dataclasses.dataclass
class _Task:
    sample: PlannedSample
    label_name: str
    full_path: str
    reencode: bool
    short_side: int
    keyframe_interval: int


@dataclasses.dataclass
class _Done:
    sample: PlannedSample
    ext: str = ""
    data: bytes = b""
    meta: SampleMeta | None = None
    skip: Skipped | None = None


def _process(task: _Task) -> _Done:
    """Read, probe and optionally re-encode one video (runs in a pool worker)."""
    sample = task.sample
    try:
        with open(task.full_path, "rb") as f:
            data = f.read()
        if not data:
            raise SkipVideo("empty")
        ext = sample.path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(sample.path) else ""
        info = probe_video(data)
        if task.reencode:
            try:
                data = reencode_video(data, task.short_side, task.keyframe_interval)
                info = probe_video(data)
            except (av.FFmpegError, SkipVideo, ValueError, OSError) as e:
                raise SkipVideo("reencode_error", str(e)) from None
            ext = "mp4"
        elif ext not in VIDEO_EXTENSIONS:
            raise SkipVideo("unsupported_extension", f".{ext}")
    except FileNotFoundError as e:
        return _Done(sample, skip=Skipped(sample.source, "missing", str(e)))
    except OSError as e:
        return _Done(sample, skip=Skipped(sample.source, "unreadable", str(e)))
    except SkipVideo as e:
        return _Done(sample, skip=Skipped(sample.source, e.reason, e.detail))
    meta = SampleMeta(
        source=sample.source,
        label=sample.label,
        label_name=task.label_name,
        duration=round(info.duration, 6),
        fps=round(info.fps, 6),
        num_frames=info.num_frames,
        width=info.width,
        height=info.height,
        codec=info.codec,
        reencoded=task.reencode,
    )
    return _Done(sample, ext=ext, data=data, meta=meta)


# --------------------------------------------------------------------------- planning


def _source_for_meta(item: ann.Item) -> str:
    # Absolute CSV paths are stored relative to the root so shards do not leak host paths.
    return item.path if os.path.isabs(item.source) else item.source


def plan(options: ConvertOptions, annotations: ann.Annotations) -> tuple[list[list[PlannedSample]], list[Skipped]]:
    """Static checks and the deterministic sample -> shard assignment.

    Returns (shards, skipped): shards[k] lists the samples of shard k in write order.
    """
    skipped: list[Skipped] = []
    usable: list[tuple[ann.Item, int]] = []
    for item in annotations.items:
        if item.problem:
            detail = f"{item.where}: label {item.label_text!r}" if item.problem == ann.UNKNOWN_LABEL else item.where
            skipped.append(Skipped(item.source, item.problem, detail))
            continue
        full = os.path.join(options.root, item.path)
        if not os.path.isfile(full):
            skipped.append(Skipped(item.source, "missing", f"{item.where}: {full}"))
            continue
        size = os.path.getsize(full)
        if size == 0:
            skipped.append(Skipped(item.source, "empty", f"{item.where}: {full}"))
            continue
        usable.append((item, size))

    if options.shuffle_seed is not None:
        order = np.random.default_rng(options.shuffle_seed).permutation(len(usable))
        usable = [usable[i] for i in order]

    shards: list[list[PlannedSample]] = []
    current: list[PlannedSample] = []
    current_bytes = 0
    per_shard = options.samples_per_shard
    if per_shard is None and options.max_shard_bytes is None:
        per_shard = DEFAULT_SAMPLES_PER_SHARD
    for index, (item, size) in enumerate(usable):
        cost = size + _SAMPLE_OVERHEAD_BYTES
        full = len(current) >= per_shard if per_shard else current_bytes + cost > options.max_shard_bytes
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(PlannedSample(index, _source_for_meta(item), item.path, item.label))
        current_bytes += cost
    if current:
        shards.append(current)
    return shards, skipped


# --------------------------------------------------------------------------- writing


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: Any):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.num_bytes

    def flush(self) -> None:
        self._f.flush()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and mtime: a shard's bytes depend only on its samples.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _add_sample(tar: tarfile.TarFile, done: _Done) -> None:
    key = sample_key(done.sample.index)
    assert done.meta is not None
    _add_member(tar, f"{key}.{done.ext}", done.data)
    _add_member(tar, f"{key}.{LABEL_EXT}", str(done.sample.label).encode())
    _add_member(tar, f"{key}.{META_EXT}", done.meta.to_json())


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_shard(out: str, name: str, results: Iterable[_Done]) -> tuple[ShardInfo | None, list[Skipped]]:
    """Write one shard from `results` (in order) as `.NAME.partial`, then rename it.

    Returns (info, skipped); info is None when every sample was skipped (no file).
    """
    tmp = os.path.join(out, partial_name(name))
    skipped: list[Skipped] = []
    class_counts: collections.Counter[str] = collections.Counter()
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for done in results:
                    if done.skip is not None:
                        skipped.append(done.skip)
                        continue
                    _add_sample(tar, done)
                    class_counts[str(done.sample.label)] += 1
            f.flush()
            os.fsync(f.fileno())
        num_samples = sum(class_counts.values())
        if num_samples == 0:
            os.unlink(tmp)
            return None, skipped
        os.replace(tmp, os.path.join(out, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    info = ShardInfo(
        name=name,
        num_samples=num_samples,
        num_bytes=writer.num_bytes,
        sha256=writer.sha256.hexdigest(),
        class_counts=dict(sorted(class_counts.items(), key=lambda kv: int(kv[0]))),
    )
    return info, skipped


# --------------------------------------------------------------------------- state


def _plan_digest(shards: list[list[PlannedSample]]) -> str:
    """sha256 of the sample -> shard assignment: a resumed run must plan exactly the same.

    The state file keeps only this digest, not the plan itself: it is rewritten after
    every shard, and a plan of a few hundred thousand videos is tens of megabytes.
    """
    plan_rec = [[[s.index, s.source, s.path, s.label] for s in shard] for shard in shards]
    return hashlib.sha256(json.dumps(plan_rec).encode()).hexdigest()


def _load_state(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save_state(out: str, state: dict[str, Any]) -> None:
    atomic_write_bytes(os.path.join(out, STATE_NAME), json.dumps(state).encode())


def _our_files(out: str, prefix: str) -> list[str]:
    """Names of the shards and partial shards of a shard set named `prefix` in `out`."""
    names = []
    for name in os.listdir(out):
        plain = name[1:-len(PARTIAL_SUFFIX)] if name.startswith(".") and name.endswith(PARTIAL_SUFFIX) else name
        if plain.startswith(prefix + "-") and plain.endswith(SHARD_SUFFIX):
            names.append(name)
    return sorted(names)


def _prepare_out(options: ConvertOptions, record: dict[str, Any], plan_digest: str, overwrite: bool) -> dict[str, Any]:
    """Create or resume the output folder; returns the state to continue from."""
    out = options.out
    os.makedirs(out, exist_ok=True)
    state = _load_state(out)
    existing = _our_files(out, options.prefix)
    if overwrite:
        # The earlier set may have used another prefix: its state names its shards.
        earlier = [e["info"]["name"] for e in (state or {}).get("done", {}).values() if e["info"]]
        earlier += _our_files(out, state["options"]["prefix"]) if state else []
        for name in sorted(set(existing + earlier)) + [STATE_NAME, os.path.basename(manifest_path(out))]:
            if os.path.exists(os.path.join(out, name)):
                os.unlink(os.path.join(out, name))
        state, existing = None, []
    if state is None:
        if existing or os.path.exists(manifest_path(out)):
            raise ConvertError(
                f"{out} already holds shards or a manifest that this command did not start; "
                "choose an empty --out or pass --overwrite"
            )
        return {"options": record, "plan_sha256": plan_digest, "done": {}}
    if state.get("options") != record:
        old = state.get("options") or {}
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k))
        raise ConvertError(
            f"{out} holds a conversion made with other options ({diff}); "
            "re-run with the same options to resume, or pass --overwrite"
        )
    if state.get("plan_sha256") != plan_digest:
        raise ConvertError(
            f"{out} holds a conversion of other inputs (annotations or files changed since); "
            "pass --overwrite to start again"
        )
    # A partial shard is an interrupted write: it is never reused.
    for name in existing:
        if name.endswith(PARTIAL_SUFFIX):
            os.unlink(os.path.join(out, name))
    return state


def _finished(out: str, entry: dict[str, Any] | None) -> bool:
    """A recorded shard counts as finished if its file is there with the recorded sha256."""
    if entry is None:
        return False
    info = entry["info"]
    if info is None:  # every sample was skipped: nothing on disk
        return True
    path = os.path.join(out, info["name"])
    return os.path.isfile(path) and os.path.getsize(path) == info["num_bytes"] and sha256_file(path) == info["sha256"]


# --------------------------------------------------------------------------- driver


def _results(tasks: list[_Task], workers: int) -> Iterator[_Done]:
    """Processed tasks in task order, whatever the number of workers."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_process, tasks)
        return
    # spawn, not fork: the parent may hold threads (PyAV, torch) that fork would copy
    # in a locked state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process, tasks, chunksize=1)


def convert(options: ConvertOptions, overwrite: bool = False, progress: bool | None = None) -> ConvertResult:
    """Run (or resume) a conversion; returns the manifest written and what was done.

    progress: show tqdm bars (None: only when stderr is a terminal).
    """
    from tqdm import tqdm

    start = time.time()
    annotations = ann.parse_annotations(
        options.format, options.root, options.annotations, options.labels, options.classes
    )
    shards, static_skipped = plan(options, annotations)
    record = options.record()
    state = _prepare_out(options, record, _plan_digest(shards), overwrite)
    _save_state(options.out, state)

    names = [shard_name(options.prefix, k) for k in range(len(shards))]
    todo = [k for k in range(len(shards)) if not _finished(options.out, state["done"].get(str(k)))]
    kept = len(shards) - len(todo)
    if kept:
        log.info("%s: keeping %d finished shards, writing %d", options.out, kept, len(todo))

    tasks = [
        _Task(
            sample=s,
            label_name=annotations.class_names[s.label],
            full_path=os.path.join(options.root, s.path),
            reencode=options.reencode,
            short_side=options.short_side,
            keyframe_interval=options.keyframe_interval,
        )
        for k in todo
        for s in shards[k]
    ]
    bar = tqdm(total=len(tasks), desc=f"convert {options.prefix}", unit="video", disable=None if progress is None else not progress)
    results = _results(tasks, options.workers)

    def take(n: int) -> Iterator[_Done]:
        for _ in range(n):
            done = next(results)
            bar.update(1)
            yield done

    try:
        for k in todo:
            info, skipped = _write_shard(options.out, names[k], take(len(shards[k])))
            state["done"][str(k)] = {
                "info": dataclasses.asdict(info) if info else None,
                "skipped": [dataclasses.asdict(s) for s in skipped],
            }
            _save_state(options.out, state)
    finally:
        bar.close()
        results.close()

    shard_infos, dynamic_skipped = [], []
    for k in range(len(shards)):
        entry = state["done"][str(k)]
        if entry["info"] is not None:
            shard_infos.append(ShardInfo(**entry["info"]))
        dynamic_skipped.extend(Skipped(**s) for s in entry["skipped"])
    manifest = Manifest(
        prefix=options.prefix,
        class_names=annotations.class_names,
        shards=shard_infos,
        skipped=static_skipped + dynamic_skipped,
        options=record,
    )
    save_manifest(options.out, manifest)
    return ConvertResult(manifest, options.out, len(todo), kept, time.time() - start)


def convert_synthetic(
    root: str,
    out_root: str,
    *,
    splits: Iterable[str] = ("train", "val"),
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    shuffle_seed: int | None = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, ConvertResult]:
    """Shard each split of a set written by `synth.make_synthetic_dataset` (its
    `<split>.txt` lists) into `out_root/<split>`; returns {split: result}."""
    from .synth import CLASSES_FILE, VIDEO_DIR

    results = {}
    for split in splits:
        options = ConvertOptions(
            format="kinetics",
            root=os.path.join(root, VIDEO_DIR),
            annotations=os.path.join(root, f"{split}.txt"),
            classes=os.path.join(root, CLASSES_FILE),
            out=os.path.join(out_root, split),
            prefix=split,
            samples_per_shard=samples_per_shard,
            max_shard_bytes=max_shard_bytes,
            shuffle_seed=shuffle_seed,
            workers=workers,
        )
        results[split] = convert(options, overwrite=overwrite, progress=progress)
    return results
