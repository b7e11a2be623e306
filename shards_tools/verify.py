"""Check a shard folder against its manifest (`marscale-shards verify`).

For every shard the manifest lists: the file is there, its size and sha256 match, it is
a readable tar whose members group into whole samples (one video, `.cls`, `.json`), and
its sample and class counts match. For every sample: the label is an integer in range
and equals the label in its meta record, the video decodes completely (PyAV) to the
frame count, size and frame table the meta record states, and random access returns
the sequential decode's frames: for every decoder installed here that the training
loader can use (`marscale.data.decode.available_decoders`), the reader the loader
would make with it (`decode.open_sample`: that decoder, or PyAV where the record says
the decoder is not exact for this video) is asked for sampled frames (the first and
last, around key frames, random ones) and each is compared with the sequential
decode's. A shard set that would train on wrong frames fails, naming the sample, its
source and the decoder. Keys must be unique across the set.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import tarfile
from functools import partial
from typing import Any

from .video import SkipVideo, probe_video
from .write import sha256_file
from marscale.data.decode import (
    DecodeError,
    available_decoders,
    open_sample,
    random_access_error,
    sample_index,
    spot_check_indices,
)
from marscale.data.frames import sequential_frames
from marscale.core.io import PARTIAL_SUFFIX
from marscale.data.shards import (
    LABEL_EXT,
    META_EXT,
    SHARD_SUFFIX,
    VIDEO_EXTENSIONS,
    SampleMeta,
    ShardInfo,
    load_manifest,
)


@dataclasses.dataclass
class VerifyReport:
    root: str
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"{self.root}: {self.shards_checked} shards, {self.samples_checked} samples checked"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  MISMATCH: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problems")
        return "\n".join(lines)


def read_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of one tar shard, in order: [(key, {ext: bytes})].

    Members are grouped as WebDataset does: by the name up to the first dot of the base name.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            if ext in samples[-1][1]:
                raise ValueError(f"{member.name}: member repeated within sample {key}")
            samples[-1][1][ext] = data
    return samples


def _check_sample(
    key: str, parts: dict[str, bytes], num_classes: int, decoders: list[str]
) -> tuple[int | None, list[str]]:
    """Problems with one sample; also returns its label when it is readable. `decoders`:
    the loader's decoders that must read the video (none: do not decode it)."""
    problems = []
    videos = [ext for ext in parts if ext in VIDEO_EXTENSIONS]
    missing = [ext for ext in (LABEL_EXT, META_EXT) if ext not in parts]
    if len(videos) != 1:
        problems.append(f"sample {key}: expected one video member, found {videos or 'none'}")
    if missing:
        problems.append(f"sample {key}: missing .{' .'.join(missing)}")
    if problems:
        return None, problems
    try:
        label = int(parts[LABEL_EXT].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, [f"sample {key}: .{LABEL_EXT} is not an ASCII integer: {parts[LABEL_EXT][:20]!r}"]
    if not 0 <= label < num_classes:
        problems.append(f"sample {key}: label {label} outside 0..{num_classes - 1}")
    try:
        meta = SampleMeta.from_json(parts[META_EXT])
    except (ValueError, TypeError) as e:
        return label, problems + [f"sample {key}: bad .{META_EXT} record ({e})"]
    if meta.label != label:
        problems.append(f"sample {key}: .{LABEL_EXT} says {label}, meta says {meta.label}")
    if decoders:
        problems += _check_video(key, videos[0], parts[videos[0]], meta, decoders)
    return label, problems


def _check_video(key: str, ext: str, data: bytes, meta: SampleMeta, decoders: list[str]) -> list[str]:
    """The sequential decode against the record, then each decoder's random access (as the
    loader reads this sample) against the sequential decode."""
    name = f"sample {key} ({meta.source})"
    try:
        info = probe_video(data)
    except SkipVideo as e:
        return [f"{name}: video does not decode ({e.reason}: {e.detail})"]
    problems = []
    if info.num_frames != meta.num_frames:
        problems.append(f"{name}: {info.num_frames} frames decode, meta says {meta.num_frames}")
    if (info.width, info.height) != (meta.width, meta.height):
        problems.append(f"{name}: decodes at {info.width}x{info.height}, meta says {meta.width}x{meta.height}")
    if meta.frames is not None and info.scan.index.to_record() != meta.frames:
        problems.append(f"{name}: the frames' timestamps differ from the record's frame table")
    if problems:
        return problems
    try:
        index = sample_index(meta)
        reference = sequential_frames(data, spot_check_indices(info.scan.index))
    except DecodeError as e:
        return [f"{name}: {e}"]
    for decoder in decoders:
        error = random_access_error(partial(open_sample, data, ext, meta, decoder), index, reference)
        if error is not None:
            problems.append(f"{name}: reading with the {decoder} decoder gives wrong frames: {error}")
    return problems


def _check_shard(job: tuple[str, ShardInfo, int, bool]) -> tuple[list[str], list[str], int]:
    """(problems, keys, samples checked) for one shard listed in the manifest."""
    root, info, num_classes, decode = job
    decoders = available_decoders() if decode else []
    path = os.path.join(root, info.name)
    if not os.path.isfile(path):
        return [f"{info.name}: missing"], [], 0
    problems = []
    size = os.path.getsize(path)
    if size != info.num_bytes:
        problems.append(f"{info.name}: {size} bytes, manifest says {info.num_bytes}")
    digest = sha256_file(path)
    if digest != info.sha256:
        problems.append(f"{info.name}: sha256 {digest[:12]}..., manifest says {info.sha256[:12]}...")
    try:
        samples = read_samples(path)
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        return problems + [f"{info.name}: not a readable tar ({e})"], [], 0
    counts: collections.Counter[str] = collections.Counter()
    for key, parts in samples:
        label, sample_problems = _check_sample(key, parts, num_classes, decoders)
        problems += [f"{info.name}: {p}" for p in sample_problems]
        if label is not None:
            counts[str(label)] += 1
    if len(samples) != info.num_samples:
        problems.append(f"{info.name}: {len(samples)} samples, manifest says {info.num_samples}")
    if dict(counts) != {k: v for k, v in info.class_counts.items() if v}:
        problems.append(f"{info.name}: class counts {dict(sorted(counts.items()))}, manifest says {info.class_counts}")
    return problems, [key for key, _ in samples], len(samples)


def verify(root: str, workers: int = 1, decode: bool = True, progress: bool | None = None) -> VerifyReport:
    """Check every shard of the set in `root`; `decode=False` skips decoding the videos."""
    from tqdm import tqdm

    report = VerifyReport(root)
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        report.problems.append(str(e))
        return report
    if manifest.format_version < 2:
        report.warnings.append(
            f"format version {manifest.format_version}: the records have no frame tables, so the loader reads "
            "every video with PyAV from its first frame (exact, but slower); re-convert to add them"
        )
    listed = {s.name for s in manifest.shards}
    for name in sorted(os.listdir(root)):
        if name.endswith(PARTIAL_SUFFIX) and SHARD_SUFFIX in name:
            report.warnings.append(f"{name}: unfinished shard (an interrupted convert; re-run it to finish)")
        elif name.endswith(SHARD_SUFFIX) and name not in listed:
            report.warnings.append(f"{name}: shard file not listed in the manifest")

    jobs = [(root, info, manifest.num_classes, decode) for info in manifest.shards]
    bar = tqdm(total=len(jobs), desc="verify", unit="shard", disable=None if progress is None else not progress)
    keys: collections.Counter[str] = collections.Counter()
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results: Any = list(_track(pool.imap(_check_shard, jobs), bar))
    else:
        results = list(_track(map(_check_shard, jobs), bar))
    bar.close()
    for problems, shard_keys, n in results:
        report.problems += problems
        keys.update(shard_keys)
        report.samples_checked += n
        report.shards_checked += 1
    repeated = sorted(k for k, n in keys.items() if n > 1)
    if repeated:
        report.problems.append(f"{len(repeated)} keys appear more than once, e.g. {repeated[:3]}")
    return report


def _track(results, bar):
    for r in results:
        bar.update(1)
        yield r
