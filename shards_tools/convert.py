"""Convert an annotated video dataset into WebDataset shards (`marscale-shards convert`).

Stages, in order:

1. parse the annotations (`annotations.py`);
2. plan (`plan.py`): drop entries that are unusable without opening them, optionally
   shuffle, number the samples and cut the list into shards. Shard k always holds the
   same samples, so a re-run knows what each shard should contain;
3. for every shard not already finished: read and probe each video (`video.py`: decode
   every frame, which gives the frame table stored in its record) in a process pool;
   re-encode it when asked (`--reencode`), or at its own size when its container is not
   one shards store as they are (`STORED_AS_IS`); check every installed decoder's
   random access against the sequential decode on sampled frames and record the exact
   ones (`SampleMeta.exact_decoders`: the loader reads with PyAV where its decoder is
   not listed). A video the training loader's default decoder (the one
   `data.decoder: auto` picks here) cannot read exactly is re-encoded to H.264 at its
   own size and kept if that fixes it, else skipped. Then write the shard in the main
   process in plan order (`write.py`). Output bytes do not depend on the number of
   workers;
4. write ``manifest.json`` atomically.

Inputs that give no sample at all (an empty annotation file, a folder without class
folders, every video skipped) are errors, not an empty shard set.

Progress is recorded in ``.convert-state.json`` after every shard (`write.py`), so
re-running the same command after an interruption keeps the finished shards whose
checksum still matches and writes only the rest.

Videos that cannot be used are skipped, never written half-way, and listed in the
manifest's ``skipped`` with a reason (see `SKIP_REASONS`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import time
from typing import Iterable, Iterator

import av

from . import annotations as ann
from .options import ConvertOptions
from .plan import PlannedSample, plan, plan_digest
from .video import SkipVideo, VideoInfo, exact_decoders, probe_video, reencode_video
from .write import ConvertError, ProcessedSample, prepare_out, save_state, shard_finished, write_shard
from marscale.data.decode import resolve_decoder
from marscale.data.shards import (
    VIDEO_EXTENSIONS,
    Manifest,
    SampleMeta,
    ShardInfo,
    Skipped,
    save_manifest,
    shard_name,
)

log = logging.getLogger(__name__)

# Why an input was skipped (manifest `skipped[].reason`).
SKIP_REASONS = {
    ann.UNKNOWN_LABEL: "label is not one of the classes",
    ann.OUTSIDE_ROOT: "path leaves the dataset root",
    ann.DUPLICATE: "the same video is listed again",
    "missing": "file does not exist",
    "empty": "file is empty",
    "unreadable": "not a video container, or cut off before its index",
    "no_video_stream": "container has no video stream",
    "decode_error": "decoding failed part-way",
    "truncated": "file is cut short (container framing or frame count)",
    "no_frames": "no frame decodes",
    "reencode_error": "re-encoding failed",
    "decoder": "the loader's default decoder cannot read it exactly, re-encoded or not",
    ann.HIDDEN: "hidden file (name starts with a dot) in a class folder",
}

# Containers stored as they are without --reencode: the loader recognises them by their
# member extension (`marscale.data.shards.VIDEO_EXTENSIONS`) and each has a seek index.
# Anything else FFmpeg decodes (MPEG-1/2 program and transport streams, FLV, Ogg/Theora,
# ASF/WMV, 3GP, ...) is re-encoded to H.264 in MP4 at its own size.
STORED_AS_IS = VIDEO_EXTENSIONS


@dataclasses.dataclass
class ConvertResult:
    """What `convert` did: the manifest it wrote, shards written and kept, wall time."""

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


@dataclasses.dataclass
class _Task:
    """One planned sample and what a pool worker needs to process it (picklable)."""

    sample: PlannedSample
    label_name: str
    full_path: str
    reencode: bool
    short_side: int
    keyframe_interval: int
    decoder: str
    """The loader's default decoder, which must read the stored video."""


def _own_size(data: bytes, info: VideoInfo, keyframe_interval: int, reason: str) -> tuple[bytes, VideoInfo]:
    """`data` re-encoded to H.264 at its own size (square pixels, display orientation), probed."""
    try:
        fixed = reencode_video(data, None, keyframe_interval, info.scan)
        return fixed, probe_video(fixed)
    except (av.FFmpegError, SkipVideo, ValueError, OSError) as e:
        raise SkipVideo("reencode_error", f"{reason}; re-encoding failed: {e}") from None


def _exact(data: bytes, info: VideoInfo, task: _Task, reencoded: bool) -> tuple[bytes, VideoInfo, list[str], bool]:
    """(data, info, exact decoders, False) if `task.decoder` reads `data` exactly; else,
    unless it was re-encoded already, the same for `data` re-encoded at its own size
    (True) if the decoder reads that exactly. Raises SkipVideo("decoder") when neither."""
    exact, errors = exact_decoders(data, info)
    if task.decoder in exact:
        return data, info, exact, False
    error = errors[task.decoder]
    if reencoded:
        raise SkipVideo("decoder", f"{task.decoder}: {error}")
    try:
        fixed, fixed_info = _own_size(data, info, task.keyframe_interval, f"{task.decoder}: {error}")
    except SkipVideo as e:
        raise SkipVideo("decoder", e.detail) from None
    exact, errors = exact_decoders(fixed, fixed_info)
    if task.decoder not in exact:
        raise SkipVideo("decoder", f"{task.decoder}: {error}; after re-encoding: {errors[task.decoder]}")
    log.info("%s: re-encoded to H.264 (same size) for %s, which could not read it exactly: %s",
             task.sample.source, task.decoder, error)
    return fixed, fixed_info, exact, True


def _process(task: _Task) -> ProcessedSample:
    """Read, probe, optionally re-encode and check one video (runs in a pool worker)."""
    sample = task.sample
    try:
        with open(task.full_path, "rb") as f:
            data = f.read()
        if not data:
            raise SkipVideo("empty")
        ext = sample.path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(sample.path) else ""
        info = probe_video(data)
        reencoded = task.reencode or ext not in STORED_AS_IS
        if task.reencode:
            try:
                data = reencode_video(data, task.short_side, task.keyframe_interval, info.scan)
                info = probe_video(data)
            except (av.FFmpegError, SkipVideo, ValueError, OSError) as e:
                raise SkipVideo("reencode_error", str(e)) from None
        elif reencoded:
            data, info = _own_size(data, info, task.keyframe_interval, f"container .{ext} is not stored as it is")
            log.info("%s: re-encoded to H.264 in MP4 (same size): .%s is not stored as it is", sample.source, ext)
        data, info, exact, fixed = _exact(data, info, task, reencoded)
        reencoded = reencoded or fixed
        if reencoded:
            ext = "mp4"
    except FileNotFoundError as e:
        return ProcessedSample(sample, skip=Skipped(sample.source, "missing", str(e)))
    except OSError as e:
        return ProcessedSample(sample, skip=Skipped(sample.source, "unreadable", str(e)))
    except SkipVideo as e:
        return ProcessedSample(sample, skip=Skipped(sample.source, e.reason, e.detail))
    scan = info.scan
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
        reencoded=reencoded,
        frames=scan.index.to_record(),
        rotation=scan.rotation,
        pixel_aspect=str(scan.pixel_aspect),
        exact_decoders=exact,
        container=scan.container,
    )
    return ProcessedSample(sample, ext=ext, data=data, meta=meta)


def _results(tasks: list[_Task], workers: int) -> Iterator[ProcessedSample]:
    """Processed tasks in task order, whatever the number of workers."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_process, tasks)
        return
    # spawn, not fork: the parent may hold threads (PyAV, torch) that fork would copy
    # in a locked state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process, tasks, chunksize=1)


def _skip_summary(skipped: list[Skipped]) -> str:
    """"5 listed, all skipped: 3 missing, 2 truncated (e.g. a.mp4: missing)" for an error message."""
    if not skipped:
        return "nothing listed"
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(collections.Counter(s.reason for s in skipped).items()))
    first = skipped[0]
    return f"{len(skipped)} listed, all skipped: {counts} (e.g. {first.source}: {first.reason} {first.detail})"


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
    if not shards:
        raise ConvertError(f"no usable video: {_skip_summary(static_skipped)}")
    # The reader the loader's `data.decoder: auto` picks on this machine must read every stored video.
    decoder = resolve_decoder("auto")
    record = options.record()
    state = prepare_out(options.out, options.prefix, record, plan_digest(shards), overwrite)
    save_state(options.out, state)

    names = [shard_name(options.prefix, k) for k in range(len(shards))]
    todo = [k for k in range(len(shards)) if not shard_finished(options.out, state["done"].get(str(k)))]
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
            decoder=decoder,
        )
        for k in todo
        for s in shards[k]
    ]
    bar = tqdm(total=len(tasks), desc=f"convert {options.prefix}", unit="video", disable=None if progress is None else not progress)
    results = _results(tasks, options.workers)

    def take(n: int) -> Iterator[ProcessedSample]:
        for _ in range(n):
            done = next(results)
            bar.update(1)
            yield done

    try:
        for k in todo:
            info, skipped = write_shard(options.out, names[k], take(len(shards[k])))
            state["done"][str(k)] = {
                "info": dataclasses.asdict(info) if info else None,
                "skipped": [dataclasses.asdict(s) for s in skipped],
            }
            save_state(options.out, state)
    finally:
        bar.close()
        results.close()

    shard_infos, dynamic_skipped = [], []
    for k in range(len(shards)):
        entry = state["done"][str(k)]
        if entry["info"] is not None:
            shard_infos.append(ShardInfo(**entry["info"]))
        dynamic_skipped.extend(Skipped(**s) for s in entry["skipped"])
    if not shard_infos:
        raise ConvertError(f"no video could be stored: {_skip_summary(static_skipped + dynamic_skipped)}")
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
