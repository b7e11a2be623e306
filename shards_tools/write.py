"""Write shards and keep the resume state of a conversion.

A shard is written from processed samples in plan order as ``.NAME.partial`` and
renamed into place once whole; its tar members have fixed owner, mode and mtime, so its
bytes depend only on its samples, and its sha256 is computed while it is written.

``.convert-state.json`` records the options, the plan's digest and every finished
shard (with its sha256 and skipped samples); it is saved after every shard, so an
interrupted conversion resumes by keeping the finished shards whose checksum still
matches and writing only the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Iterable

from .plan import PlannedSample
from marscale.core.io import PARTIAL_SUFFIX, atomic_write_bytes
from marscale.data.shards import (
    LABEL_EXT,
    META_EXT,
    SHARD_SUFFIX,
    SampleMeta,
    ShardInfo,
    Skipped,
    manifest_path,
    partial_name,
    sample_key,
)

STATE_NAME = ".convert-state.json"


class ConvertError(RuntimeError):
    """The conversion cannot proceed; the message says what to change."""


@dataclasses.dataclass
class ProcessedSample:
    """A planned sample after reading and probing: what to write, or why it is skipped."""

    sample: PlannedSample
    ext: str = ""
    data: bytes = b""
    meta: SampleMeta | None = None
    skip: Skipped | None = None


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


def _add_sample(tar: tarfile.TarFile, processed: ProcessedSample) -> None:
    key = sample_key(processed.sample.index)
    assert processed.meta is not None
    _add_member(tar, f"{key}.{processed.ext}", processed.data)
    _add_member(tar, f"{key}.{LABEL_EXT}", str(processed.sample.label).encode())
    _add_member(tar, f"{key}.{META_EXT}", processed.meta.to_json())


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks: the checksum a manifest records for a shard."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(out: str, name: str, results: Iterable[ProcessedSample]) -> tuple[ShardInfo | None, list[Skipped]]:
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
                for processed in results:
                    if processed.skip is not None:
                        skipped.append(processed.skip)
                        continue
                    _add_sample(tar, processed)
                    class_counts[str(processed.sample.label)] += 1
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


def _load_state(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_state(out: str, state: dict[str, Any]) -> None:
    """Replace the state file atomically: an interruption leaves the previous one whole."""
    atomic_write_bytes(os.path.join(out, STATE_NAME), json.dumps(state).encode())


def _our_files(out: str, prefix: str) -> list[str]:
    """Names of the shards and partial shards of a shard set named `prefix` in `out`."""
    names = []
    for name in os.listdir(out):
        plain = name[1:-len(PARTIAL_SUFFIX)] if name.startswith(".") and name.endswith(PARTIAL_SUFFIX) else name
        if plain.startswith(prefix + "-") and plain.endswith(SHARD_SUFFIX):
            names.append(name)
    return sorted(names)


def prepare_out(out: str, prefix: str, record: dict[str, Any], plan_digest: str, overwrite: bool) -> dict[str, Any]:
    """Create or resume the output folder for shard set `prefix`; returns the state to
    continue from. `record` (the options that decide the output) and `plan_digest` must
    match the state's for a resume."""
    os.makedirs(out, exist_ok=True)
    state = _load_state(out)
    existing = _our_files(out, prefix)
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


def shard_finished(out: str, entry: dict[str, Any] | None) -> bool:
    """A recorded shard counts as finished if its file is there with the recorded sha256."""
    if entry is None:
        return False
    info = entry["info"]
    if info is None:  # every sample was skipped: nothing on disk
        return True
    path = os.path.join(out, info["name"])
    return os.path.isfile(path) and os.path.getsize(path) == info["num_bytes"] and sha256_file(path) == info["sha256"]
