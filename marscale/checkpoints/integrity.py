"""Checkpoint integrity and safety: sizes and checksums in the COMPLETE marker, the checks
run before a folder is used, the same-model check on resume, and loading DeepSpeed's and
marscale's files with `weights_only=True` only (see `marscale.checkpoints.folders` for the
layout and the guarantees these give).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from typing import Any

import numpy as np

from marscale.weights.layouts import (
    CheckpointError,
    CorruptCheckpointError,
    allowing,
    deepspeed_globals,
    load_file,
)
from marscale.core.io import write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
DAMAGED_MARKER = "DAMAGED"
"""What `COMPLETE` becomes when resume finds the checkpoint damaged (with the reason)."""
# ZeRO 0-2 / ZeRO-3 name of the file with the module weights and the client state.
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_FOLDER_HINT = (
    "marscale and DeepSpeed store only tensors, plain values and a few DeepSpeed classes in a "
    "checkpoint: this file was changed after it was saved; do not load it."
)

FREE_ON_RESUME = frozenset(
    {
        "model.drop_path",
        "model.head_dropout",
        "model.grad_checkpointing",
        "model.attention",
        "model.pretrained",
        "model.pretrained_partial",
        "model.init_scale",
        "model.bridge.init",
    }
)
"""Model settings a resumed run may change: regularisation, recomputation, and where the
weights the checkpoint replaces came from. Any other `model.*` key, and `clip.tubelet_size`,
must match the checkpoint's (`check_same_model`)."""


class ModelMismatchError(CheckpointError):
    """The checkpoint was written for another model than the config describes."""


_RNG_FILE = re.compile(r"rng_state_rank\d+\.pt")


def _legacy_rng_globals() -> tuple:
    """What the RNG files of checkpoints saved before this format hold beside plain values:
    numpy's uint32 key array (rebuilding one calls no code of the file's choosing)."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    return (reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def files_of(path: str) -> list[str]:
    """Paths relative to checkpoint `path` of the files in it (sub-folders too), but the markers."""
    found = []
    for directory, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), path)
            if rel not in (COMPLETE_MARKER, DAMAGED_MARKER):
                found.append(rel)
    return sorted(found)


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(path: str, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: a few threads hash a few files at once.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        digests = pool.map(lambda name: _sha256(os.path.join(path, name)), names)
        return dict(zip(names, digests))


def file_records(path: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file of checkpoint `path` (for its marker)."""
    names = files_of(path)
    digests = _sha256_all(path, names)
    return {n: {"size": os.path.getsize(os.path.join(path, n)), "sha256": digests[n]} for n in names}


def read_marker(path: str) -> dict[str, Any]:
    """The COMPLETE marker of checkpoint `path` (CorruptCheckpointError if it is not JSON)."""
    marker = os.path.join(path, COMPLETE_MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{marker!r} is not a readable marker ({e})") from e
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{marker!r} is not a readable marker (not a JSON object)")
    return info


def check_checkpoint(path: str) -> None:
    """Raise unless every file of complete checkpoint `path` is whole and safe to load.

    Files listed in the marker must exist with the recorded size and sha256
    (`CorruptCheckpointError` naming the file otherwise); then every `*.pt` must unpickle
    with weights_only=True and the allow-list (`UnsafeCheckpointError`) and be readable
    (`CorruptCheckpointError`: the only check of a marker written before checksums).
    """
    records = read_marker(path).get("files")
    if records is None:
        logger.info("note: %s was saved before checkpoints recorded checksums: its files are only "
                    "checked for readability", path)
    else:
        _check_records(path, records)
        for name, record in records.items():  # sizes first: cheap, and they catch truncation
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CorruptCheckpointError(f"{file!r} is missing (the checkpoint's marker lists it)")
            size = os.path.getsize(file)
            if size != record["size"]:
                raise CorruptCheckpointError(
                    f"{file!r} has {size} bytes, {record['size']} when it was saved (truncated?)"
                )
        digests = _sha256_all(path, sorted(records))
        for name, record in records.items():
            if digests[name] != record["sha256"]:
                raise CorruptCheckpointError(
                    f"{os.path.join(path, name)!r} has another sha256 than when it was saved (corrupt or changed)"
                )
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.pt"), recursive=True)):
        load_checkpoint_file(file, mmap=True)


def _check_records(path: str, records: Any) -> None:
    """The marker's file list has the shape `file_records` writes, inside the folder."""

    def well_formed(name: Any, record: Any) -> bool:
        inside = isinstance(name, str) and not os.path.isabs(name) and ".." not in name.split(os.sep)
        return (
            inside
            and isinstance(record, dict)
            and isinstance(record.get("size"), int)
            and isinstance(record.get("sha256"), str)
        )

    if not isinstance(records, dict) or not all(well_formed(n, r) for n, r in records.items()):
        raise CorruptCheckpointError(f"the {COMPLETE_MARKER} marker of {path!r} has a malformed file list")


def load_checkpoint_file(file: str, *, mmap: bool = False) -> Any:
    """A file of a checkpoint folder, unpickled with the allow-list of its kind."""
    if _RNG_FILE.fullmatch(os.path.basename(file)):
        return load_file(file, allow=_legacy_rng_globals(), mmap=mmap, hint=_FOLDER_HINT)
    return load_file(file, allow=deepspeed_globals(), mmap=mmap, hint=_FOLDER_HINT)


def mark_damaged(path: str, reason: str) -> None:
    """Turn checkpoint `path` into an incomplete folder, keeping its marker's record and the reason."""
    marker = os.path.join(path, COMPLETE_MARKER)
    try:
        info = read_marker(path)
    except CorruptCheckpointError:
        info = {}
    write_json(os.path.join(path, DAMAGED_MARKER), {"reason": reason, "marker": info})
    os.unlink(marker)


def model_states_file(path: str) -> str:
    """The file of checkpoint `path` with the module weights and marscale's client state."""
    for name in _MODEL_STATES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CorruptCheckpointError(f"{path!r} holds no DeepSpeed model states file (*model_states.pt)")


def read_model_states(path: str) -> dict[str, Any]:
    """The model states of checkpoint `path` (safely; tensors memory-mapped)."""
    states = load_checkpoint_file(model_states_file(path), mmap=True)
    if not isinstance(states, dict):
        raise CorruptCheckpointError(f"{model_states_file(path)!r} holds a {type(states).__name__}, not a dict")
    return states


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a config (as a dict) that fix what the checkpoint's weights mean."""
    keys = _flatten(config.get("model", {}), "model.")
    if "tubelet_size" in config.get("clip", {}):
        keys["clip.tubelet_size"] = config["clip"]["tubelet_size"]
    return {k: v for k, v in keys.items() if k not in FREE_ON_RESUME}


def check_same_model(path: str, config: dict[str, Any]) -> None:
    """Raise `ModelMismatchError` naming every model setting in which `config` (the current
    config, as a dict) differs from the one checkpoint `path` was trained with.

    Keys only one of the two has (the config tree changed between versions) are not
    compared, and checkpoints without a stored config pass: `load_checkpoint` still turns
    DeepSpeed's shape errors into one line.
    """
    stored = read_model_states(path).get("marscale", {}).get("config")
    if not isinstance(stored, dict):
        return
    then, now = _architecture(stored), _architecture(config)
    keys = sorted(set(then) & set(now))
    diffs = [f"{k} is {then.get(k)!r} there, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k)]
    if diffs:
        raise ModelMismatchError(
            f"checkpoint {path} was trained with another model: {'; '.join(diffs)}. Resume it with the "
            f"model settings it was saved with, or start a new run from its weights "
            f"(marscale export, then model.pretrained=...)"
        )


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside the block is weights_only=True with DeepSpeed's allow-list,
    whatever its caller passes (see the module docstring)."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with allowing(deepspeed_globals()):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
