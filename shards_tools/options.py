"""What a conversion is asked to do (`ConvertOptions`): read by planning (`plan.py`) and by
the converter (`convert.py`), so neither imports the other for it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from . import annotations as ann
from marscale.data.shards import FORMAT_VERSION

DEFAULT_SAMPLES_PER_SHARD = 500


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
        # Shards of another format version must not be mixed into one set on resume.
        out["format_version"] = FORMAT_VERSION
        return out
