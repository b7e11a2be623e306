"""The on-disk format of marscale video shards: names, keys, the sample record, the manifest.

The library owns the format: `marscale.data` reads shards with these names and keys, and
the dataset tools (`marscale-shards`) import this module to write them. Keep every constant about
the format here so the two ends cannot drift apart.

A shard set is a folder::

    PREFIX-000000.tar, PREFIX-000001.tar, ...   WebDataset tar shards
    manifest.json                              counts, classes, checksums, options, skips

Each sample in a shard is three tar members sharing one key (``__key__``):

    KEY.mp4 | KEY.webm | ...   the encoded video bytes (extension as stored)
    KEY.cls                    the integer label, ASCII decimal
    KEY.json                   a `SampleMeta` record (UTF-8 JSON)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from marscale.core.io import PARTIAL_SUFFIX, atomic_write_bytes

FORMAT_VERSION = 2
# Version 1 records have no frame table, rotation, pixel aspect or checked decoders; they
# are read exactly all the same (`marscale.data.decode.open_sample`), only more slowly.
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
LABEL_EXT = "cls"
META_EXT = "json"
SHARD_SUFFIX = ".tar"
# A shard is written as `.NAME.partial` (PARTIAL_SUFFIX, marscale.core.io) and renamed to NAME
# when complete, so a shard that exists under its final name is always whole.


KEY_DIGITS = 9


def sample_key(index: int) -> str:
    """`__key__` of the sample at global position `index` of the shard set.

    Keys are the zero-padded global sample index (position after the optional
    pre-sharding shuffle), so readers can tag evaluation views with a unique video id.
    """
    return f"{index:0{KEY_DIGITS}d}"


def key_to_index(key: str) -> int:
    """The global sample index a `sample_key` encodes; ValueError naming the key for anything
    else (another tool's key, a member name such as ``../x``, a sign, non-ASCII digits)."""
    if not (len(key) >= KEY_DIGITS and key.isascii() and key.isdigit()):
        raise ValueError(f"sample key {key!r} is not a marscale key ({KEY_DIGITS} or more digits: the sample index)")
    return int(key)


def shard_name(prefix: str, index: int) -> str:
    """`PREFIX-000042.tar`."""
    return f"{prefix}-{index:06d}{SHARD_SUFFIX}"


def partial_name(name: str) -> str:
    """Temporary name of a shard while it is being written."""
    return f".{name}{PARTIAL_SUFFIX}"


@dataclasses.dataclass
class SampleMeta:
    """The JSON record stored beside each video.

    Frame numbers, counts and rates follow `marscale.data.frames` (frame i is the i-th
    frame of a full sequential decode, in display orientation); the converter measures
    them on the stored bytes.
    """

    source: str  # path relative to the dataset root (or the SSv2 id)
    label: int
    label_name: str
    duration: float  # seconds: num_frames / fps
    fps: float  # measured on the frames' timestamps: (N - 1) / (last - first)
    num_frames: int  # frames of the full sequential decode
    width: int  # display size: after rotation
    height: int
    codec: str = ""
    reencoded: bool = False
    frames: dict[str, Any] | None = None
    """The frame table (`marscale.data.frames.FrameIndex.to_record`): time base, every
    frame's timestamp and the key frames, run-length encoded. None in version 1 records
    and for videos whose frames carry no usable timestamps (read from the start)."""
    rotation: int = 0
    """Counter-clockwise degrees the readers rotate the stored frames by (display matrix)."""
    pixel_aspect: str = "1"
    """Pixel (sample) aspect ratio of the stored frames as a fraction ("4/3"); readers
    return the stored pixel grid, re-encoding resamples to square pixels ("1")."""
    exact_decoders: list[str] | None = None
    """Decoders whose random access matched the sequential decode at conversion; the
    loader reads this video with PyAV when its decoder is not listed. None: not checked
    (version 1 records)."""
    container: str = ""
    """FFmpeg's name of the container format of the stored bytes."""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "SampleMeta":
        return cls(**json.loads(data))


@dataclasses.dataclass
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    class_counts: dict[str, int]  # label index (as str, JSON keys) -> count


@dataclasses.dataclass
class Skipped:
    source: str
    reason: str
    detail: str = ""  # where the input was named (FILE:LINE) and what went wrong


@dataclasses.dataclass
class Manifest:
    """`manifest.json`: everything needed to check and read a shard set."""

    prefix: str
    class_names: list[str]
    shards: list[ShardInfo]
    skipped: list[Skipped]
    options: dict[str, Any]
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for shard in self.shards:
            for label, n in shard.class_counts.items():
                counts[int(label)] = counts.get(int(label), 0) + n
        return dict(sorted(counts.items()))

    def shard_paths(self, root: str) -> list[str]:
        return [os.path.join(root, s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["num_samples"] = self.num_samples
        out["num_shards"] = len(self.shards)
        out["class_counts"] = {str(k): v for k, v in self.class_counts().items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        version = d.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"manifest format_version {version!r} is not supported (this marscale reads "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        return cls(
            prefix=d["prefix"],
            class_names=list(d["class_names"]),
            shards=[ShardInfo(**s) for s in d["shards"]],
            skipped=[Skipped(**s) for s in d.get("skipped", [])],
            options=dict(d.get("options", {})),
            format_version=version,
        )


def manifest_path(root: str) -> str:
    return os.path.join(root, MANIFEST_NAME)


def load_manifest(root: str) -> Manifest:
    """Read `root/manifest.json`; errors name the file and what is wrong."""
    path = manifest_path(root)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root!r}: is this a marscale shard folder?")
    try:
        with open(path) as f:
            return Manifest.from_dict(json.load(f))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid marscale manifest ({e})") from e


def save_manifest(root: str, manifest: Manifest) -> None:
    atomic_write_bytes(manifest_path(root), json.dumps(manifest.to_dict(), indent=1).encode())


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """What a run needs of one shard folder, read from its manifest once (`ShardSet.load`)
    and passed to the loaders, the evaluation and the run plan."""

    root: str
    """The shard folder."""
    shards: tuple[str, ...]
    """Paths of the shards, in manifest order."""
    shard_videos: tuple[int, ...]
    """Videos in each shard."""
    class_names: tuple[str, ...]
    """Class names; a label is an index into them."""

    @classmethod
    def load(cls, root: str) -> "ShardSet":
        manifest = load_manifest(root)
        if not manifest.shards:
            raise ValueError(f"{root}: the manifest lists no shards")
        return cls(
            root=root,
            shards=tuple(manifest.shard_paths(root)),
            shard_videos=tuple(s.num_samples for s in manifest.shards),
            class_names=tuple(manifest.class_names),
        )

    @property
    def num_videos(self) -> int:
        return sum(self.shard_videos)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
