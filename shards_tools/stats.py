"""Dataset statistics of a shard folder (`marscale-shards stats`).

Reads only the manifest and the small `.json` meta records in the shards (no video
decoding), so it is quick even on large sets.
"""

from __future__ import annotations

import collections
import os
import tarfile
from fractions import Fraction
from typing import Any

import numpy as np

from marscale.data.frames import decode_runs
from marscale.data.shards import META_EXT, SampleMeta, load_manifest


def _metas(path: str) -> list[SampleMeta]:
    metas = []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(f".{META_EXT}"):
                f = tar.extractfile(member)
                if f is not None:
                    metas.append(SampleMeta.from_json(f.read()))
    return metas


def _variable_rate(meta: SampleMeta) -> bool:
    """Whether the record's frame timestamps are unevenly spaced."""
    return meta.frames is not None and len(np.unique(np.diff(decode_runs(meta.frames["pts"])))) > 1


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "max": float(a.max()),
        "total": float(a.sum()),
    }


def collect_stats(root: str) -> dict[str, Any]:
    """Counts, class balance, durations, resolutions, frame rates and skips of one shard set."""
    manifest = load_manifest(root)
    metas: list[SampleMeta] = []
    for path in manifest.shard_paths(root):
        metas.extend(_metas(path))
    counts = collections.Counter(m.label for m in metas)
    total = len(metas)
    return {
        "root": root,
        "prefix": manifest.prefix,
        "num_shards": len(manifest.shards),
        "num_samples": total,
        "num_bytes": sum(s.num_bytes for s in manifest.shards),
        "classes": [
            {"label": i, "name": name, "count": counts.get(i, 0), "fraction": counts.get(i, 0) / total if total else 0.0}
            for i, name in enumerate(manifest.class_names)
        ],
        "duration_s": _summary([m.duration for m in metas]),
        "num_frames": _summary([float(m.num_frames) for m in metas]),
        "resolutions": dict(collections.Counter(f"{m.width}x{m.height}" for m in metas).most_common()),
        "fps": dict(collections.Counter(f"{m.fps:g}" for m in metas).most_common()),
        "codecs": dict(collections.Counter(m.codec for m in metas).most_common()),
        "reencoded": sum(m.reencoded for m in metas),
        # What the frame-exact readers need to know (marscale.data.frames): videos shown
        # rotated, stored with non-square pixels (raw frames keep them), with variable
        # frame timing, without a frame table (version 1 records: read from the first
        # frame), and read with PyAV because the default decoder was not exact on them.
        "rotated": sum(m.rotation != 0 for m in metas),
        "non_square_pixels": sum(Fraction(m.pixel_aspect) != 1 for m in metas),
        "variable_frame_rate": sum(_variable_rate(m) for m in metas),
        "without_frame_table": sum(m.frames is None for m in metas),
        "decoders_exact": dict(collections.Counter(d for m in metas for d in (m.exact_decoders or [])).most_common()),
        "skipped": dict(collections.Counter(s.reason for s in manifest.skipped).most_common()),
    }


def format_stats(stats: dict[str, Any], max_classes: int = 50) -> str:
    """A plain-text table of `collect_stats` output."""
    lines = [
        f"{stats['root']} (prefix {stats['prefix']}): {stats['num_samples']} samples, "
        f"{stats['num_shards']} shards, {stats['num_bytes'] / 2**20:.1f} MiB",
    ]
    classes = stats["classes"]
    if classes:
        counts = [c["count"] for c in classes]
        lines.append(
            f"classes: {len(classes)}  (per class min {min(counts)}, max {max(counts)}, "
            f"imbalance max/min {max(counts) / max(1, min(counts)):.2f})"
        )
        width = max(len(c["name"]) for c in classes)
        shown = sorted(classes, key=lambda c: -c["count"]) if len(classes) > max_classes else classes
        for c in shown[:max_classes]:
            lines.append(f"  {c['label']:>5}  {c['name']:<{width}}  {c['count']:>8}  {100 * c['fraction']:6.2f}%")
        if len(classes) > max_classes:
            lines.append(f"  ... {len(classes) - max_classes} more classes (see --json)")
    for name, key, unit in (("duration", "duration_s", "s"), ("frames", "num_frames", "")):
        s = stats[key]
        if s:
            lines.append(
                f"{name}: min {s['min']:.2f}{unit}  mean {s['mean']:.2f}{unit}  median {s['median']:.2f}{unit}  "
                f"max {s['max']:.2f}{unit}  total {s['total']:.1f}{unit}"
            )
    for name in ("resolutions", "fps", "codecs", "skipped"):
        items = list(stats[name].items())
        if items:
            shown = ", ".join(f"{k}: {v}" for k, v in items[:10])
            more = f", ... ({len(items) - 10} more)" if len(items) > 10 else ""
            lines.append(f"{name}: {shown}{more}")
    lines.append(f"re-encoded: {stats['reencoded']} of {stats['num_samples']}")
    lines.append(
        f"rotated: {stats['rotated']}, non-square pixels: {stats['non_square_pixels']}, "
        f"variable frame rate: {stats['variable_frame_rate']}, without frame table: {stats['without_frame_table']}"
    )
    if stats["decoders_exact"]:
        lines.append("random access exact: " + ", ".join(f"{k}: {v}" for k, v in stats["decoders_exact"].items()))
    return "\n".join(lines)


def stats_for(roots: list[str]) -> list[dict[str, Any]]:
    return [collect_stats(os.path.abspath(r)) for r in roots]
