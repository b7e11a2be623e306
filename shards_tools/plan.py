"""Plan a conversion: which usable video goes, under which key, into which shard.

Entries that are unusable without opening them (unknown label, outside the root,
duplicate, missing or empty file) are dropped here. The rest are optionally shuffled
(seeded), numbered (key = position) and cut into shards by sample count or by source
bytes. The plan depends only on the annotations, the files' sizes and the options, so
shard k always holds the same samples and a resumed run can check, by `plan_digest`,
that it would write what the interrupted one started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from . import annotations as ann
from .options import DEFAULT_SAMPLES_PER_SHARD, ConvertOptions
from marscale.data.shards import Skipped

# Tar header plus padding, and the .cls/.json members: used to plan shards by bytes.
_SAMPLE_OVERHEAD_BYTES = 3 * 1024 + 1024


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    """One usable video and its place in the shard set."""

    index: int  # global position: the sample key
    source: str
    path: str  # relative to the root
    label: int


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


def plan_digest(shards: list[list[PlannedSample]]) -> str:
    """sha256 of the sample -> shard assignment: a resumed run must plan exactly the same.

    The state file keeps only this digest, not the plan itself: it is rewritten after
    every shard, and a plan of a few hundred thousand videos is tens of megabytes.
    """
    plan_rec = [[[s.index, s.source, s.path, s.label] for s in shard] for shard in shards]
    return hashlib.sha256(json.dumps(plan_rec).encode()).hexdigest()
