"""DeepSpeed checkpoints that count only once complete, load only when intact and never run
code from their files; resume selection; RNG state.

Layout of a run's checkpoints::

    <output_dir>/checkpoints/
        step-1000/          DeepSpeed's files (model states, ZeRO shards of every rank)
            rng_state_rank0.pt, rng_state_rank1.pt, ...   python/numpy/torch RNG per rank
            COMPLETE        written last, atomically, by the main rank: step, world size,
                            and the size and sha256 of every file above
        step-2000/ ...

Complete: a folder is a checkpoint only if `COMPLETE` exists in it. Every rank saves,
then all ranks meet at a barrier, and only then does the main rank write the marker.
A job killed while saving leaves a folder without the marker, which resume ignores (it
falls back to the newest complete one) and a later save of the same step replaces.
DeepSpeed's own `latest` file is not written: it would name a checkpoint before it is
complete. A save that runs out of disk space (`NoSpaceLeft`) says so, with the space it
needs; its folder never gets a marker and is removed, the previous checkpoint stays.

Intact: before writing the marker, the main rank records the size and sha256 of every
file of the folder (the files of all ranks: on the shared filesystem they are all there
once the barrier has passed). `find_checkpoint` (resume, `marscale eval --checkpoint`,
`marscale export`) checks them before anything is loaded and names the file that is
missing, truncated or changed (`CorruptCheckpointError`). Given a run or checkpoints
folder, or on `--resume auto`, a damaged checkpoint is skipped with a warning for the
next older complete one; a `step-N` folder named explicitly is an error. When resuming
from the run's own checkpoints, a damaged one's marker is renamed to `DAMAGED`, so that
pruning (which keeps the newest `keep_last` complete folders) cannot keep it in place of
the good ones, and later resumes pass over it. Markers written before checksums existed
are accepted with a note; their files are checked for readability only.

No code from checkpoint files: every file is unpickled with `weights_only=True`
(`marscale.checkpoint_layouts.load_file`). The RNG files hold only ints, floats and
tensors (`capture_rng_state`). DeepSpeed's files hold a few of DeepSpeed's own classes
beside tensors: those and nothing else are allowed (`checkpoint_layouts.DEEPSPEED_GLOBALS`);
a file with anything else is refused (`UnsafeCheckpointError`, naming the file and the
global). Two layers make this hold for the files DeepSpeed opens itself:

1. `find_checkpoint` opens every `*.pt` of the folder that way before the folder is used
   (memory-mapped: only the pickles are read), so a refused file is named;
2. DeepSpeed's loaders call `torch.load(weights_only=False)`. While DeepSpeed loads
   (`load_checkpoint`, `zero_to_fp32` in export), `weights_only_loads()` sets
   `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`, which torch reads on every call and which overrides
   the caller's `weights_only=False`, with the allow-list in force. This covers every
   loader DeepSpeed has (per ZeRO stage, universal checkpoints, ones added later) without
   patching its internals, and a file replaced between the check and the load. The
   variable is process-wide while set: a load in another thread meanwhile is stricter,
   never looser.

Checks run on the main rank; `resolve_resume` hands its answer (or its error) to every
rank, so all ranks resume from the same folder or all stop with the same message.

Old checkpoints are deleted by the main rank after the new one is complete: the marker
first (so a folder half-deleted by a crash is simply incomplete), then the files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from typing import Any, Callable

import numpy as np
import torch

from marscale import dist
from marscale.checkpoint_layouts import (
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    allowing,
    deepspeed_globals,
    load_file,
    refused_global,
)
from marscale.io import write_json

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
DAMAGED_MARKER = "DAMAGED"
"""What `COMPLETE` becomes when resume finds the checkpoint damaged (with the reason)."""
_TAG = re.compile(r"step-(\d+)")
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
        "model.pretrained",
        "model.pretrained_partial",
        "model.init_scale",
        "model.bridge.init",
    }
)
"""Model settings a resumed run may change: regularisation, recomputation, and where the
weights the checkpoint replaces came from. Any other `model.*` key, and `clip.tubelet_size`,
must match the checkpoint's (`check_same_model`)."""


class NoSpaceLeft(RuntimeError):
    """A checkpoint could not be written for lack of disk space (or quota). The message
    names the folder, the step and about how much space a checkpoint takes."""


class ModelMismatchError(CheckpointError):
    """The checkpoint was written for another model than the config describes."""


@dataclasses.dataclass
class TrainState:
    """Where training is; saved in every checkpoint (client state)."""

    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Clips trained on, over all ranks."""
    epoch: int = 0
    """Current data epoch."""
    batch_in_epoch: int = 0
    """Loader batches of this epoch already consumed by each rank (the resume offset)."""


def client_state(state: TrainState, world_size: int, config: dict[str, Any]) -> dict[str, Any]:
    """What marscale stores beside DeepSpeed's files: the training state, the world size
    it was written on and the effective config."""
    return {"marscale": {"train_state": dataclasses.asdict(state), "world_size": world_size, "config": config}}


def tag_for(step: int) -> str:
    """DeepSpeed tag (folder name) of the checkpoint after `step` optimizer steps."""
    return f"step-{step}"


def step_of(path: str) -> int | None:
    """Step number of a `step-N` folder, or None for any other name."""
    m = _TAG.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def list_checkpoints(root: str, *, complete: bool | None = True) -> list[tuple[int, str]]:
    """(step, path) of the `step-N` folders under `root`, oldest first.

    complete=True: only complete ones; False: only incomplete ones; None: all.
    """
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        step = step_of(name)
        if step is None or not os.path.isdir(path):
            continue
        if complete is None or is_complete(path) == complete:
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def find_checkpoint(path: str, *, demote_under: str | None = None) -> str:
    """A complete, intact checkpoint folder from `path`: the folder itself (`.../step-N`),
    or the newest intact one under a checkpoints folder or a run's output folder.

    Every candidate passes `check_checkpoint` first. Under a checkpoints or run folder a
    damaged one is skipped with a warning (and, when it lies in `demote_under` and an older
    intact one takes its place, marked `DAMAGED`); a `step-N` folder itself must be intact.
    Raises FileNotFoundError when there is no complete checkpoint, `CorruptCheckpointError`
    when none is intact, and `UnsafeCheckpointError` for a file that could run code (never
    skipped: someone put it there).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if step_of(path) is not None:
        if not is_complete(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} is incomplete (no {COMPLETE_MARKER} marker: the job stopped while "
                f"saving it); use an earlier step-N folder"
            )
        check_checkpoint(path)
        return path
    candidates = list_checkpoints(path) or list_checkpoints(checkpoints_root(path))
    if not candidates:
        raise FileNotFoundError(f"no complete step-N checkpoint in {path!r} or {checkpoints_root(path)!r}")
    damaged: list[tuple[str, str]] = []
    for _, candidate in reversed(candidates):
        try:
            check_checkpoint(candidate)
        except CorruptCheckpointError as e:
            logger.warning("skipping damaged checkpoint: %s", e)
            damaged.append((candidate, str(e)))
            continue
        for bad, reason in damaged:
            # Only once an intact one takes its place: with none, the next resume must
            # stop again rather than start from scratch.
            if demote_under is not None and _same_folder(os.path.dirname(bad), demote_under):
                mark_damaged(bad, reason)
                logger.warning("marked %s %s: pruning and later resumes pass over it", bad, DAMAGED_MARKER)
        if damaged:
            logger.warning("using the previous complete checkpoint %s", candidate)
        return candidate
    raise CorruptCheckpointError(
        f"no intact checkpoint in {path!r}: " + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in damaged)
    )


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resolve_resume(resume: str, output_dir: str, *, config: dict[str, Any] | None = None) -> str | None:
    """The checkpoint to resume from for `checkpoint.resume` (collective: the main rank
    checks, every rank gets its answer or raises its error).

    "" -> None (start fresh); "auto" -> the newest intact checkpoint of this run, or None
    when there is none yet (the first start of a job that is requeued later); anything
    else is a path for `find_checkpoint`, which must exist. Damaged checkpoints of this
    run are marked `DAMAGED` on the way. config: the current config as a dict; a
    checkpoint written for another model is a `ModelMismatchError` (`check_same_model`).
    """
    if not resume:
        return None
    return _decided_on_main(_resolve_resume, resume, output_dir, config)


def _resolve_resume(resume: str, output_dir: str, config: dict[str, Any] | None) -> str | None:
    own = checkpoints_root(output_dir)
    if resume == "auto":
        if not list_checkpoints(own):
            return None
        path = find_checkpoint(own, demote_under=own)
    else:
        path = find_checkpoint(resume, demote_under=own)
    if config is not None:
        check_same_model(path, config)
    return path


def _decided_on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on the main rank only; its result, or the exception it raised, reaches
    every rank (collective). One rank reads and hashes the files, and no rank waits in a
    collective for a rank that failed. (A helper of `marscale.dist`'s kind, kept here
    while this module is its only user.)"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args)
    import torch.distributed as torch_dist

    box: list[Any] = [None]
    if dist.is_main():
        try:
            box[0] = (True, fn(*args))
        except Exception as e:  # handed to every rank, raised there
            box[0] = (False, e)
    torch_dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


# --- integrity ------------------------------------------------------------------------


def _files_of(path: str) -> list[str]:
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
    names = _files_of(path)
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
        _load_checkpoint_file(file, mmap=True)


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


def _load_checkpoint_file(file: str, *, mmap: bool = False) -> Any:
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
    states = _load_checkpoint_file(model_states_file(path), mmap=True)
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


# --- RNG state ------------------------------------------------------------------------

_RNG_FILE = re.compile(r"rng_state_rank\d+\.pt")


def capture_rng_state() -> dict[str, Any]:
    """Every global random stream the training step draws from, for this process, as ints,
    floats and tensors only (so the file loads with weights_only=True):

    python: {"version", "state": int64 [625] (MT words + position), "gauss_next": float | None}
    numpy:  {"name", "keys": int64 [624], "pos", "has_gauss", "cached_gaussian"}
    torch, cuda: the generators' byte tensors
    """
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every stream `capture_rng_state` captured, bit for bit."""
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
        np.random.set_state(
            (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
             numpy["cached_gaussian"])
        )
    else:  # a checkpoint saved before the states were plain values: the tuples themselves
        random.setstate(python)
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _legacy_rng_globals() -> tuple:
    """What the RNG files of checkpoints saved before this format hold beside plain values:
    numpy's uint32 key array (rebuilding one calls no code of the file's choosing)."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    return (reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def rng_state_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_state_rank{rank}.pt")


def load_rng_state(path: str, rank: int) -> bool:
    """Restore this rank's RNG state from checkpoint `path`; False if the file is absent
    (a checkpoint written by fewer ranks)."""
    file = rng_state_file(path, rank)
    if not os.path.isfile(file):
        return False
    restore_rng_state(_load_checkpoint_file(file))
    return True


# --- save / load ----------------------------------------------------------------------


def mark_complete(path: str, info: dict[str, Any]) -> None:
    write_json(os.path.join(path, COMPLETE_MARKER), info)


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder, marker first, so a crash mid-way leaves it incomplete."""
    marker = os.path.join(path, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.unlink(marker)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all), and
    incomplete leftovers older than the newest complete one. Returns what was deleted."""
    complete = list_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for s, p in list_checkpoints(root, complete=False) if s < newest]
    if keep_last > 0:
        doomed += [p for _, p in complete[:-keep_last]]
    for path in doomed:
        remove_checkpoint(path)
    return doomed


def _gb(n: float) -> str:
    return f"{n / 1e9:.2g} GB"


def _checkpoint_bytes(engine, root: str) -> int:
    """About how much a checkpoint takes: the newest other complete one, else 16 bytes a
    parameter (fp32 weights, fp32 master copy and Adam's two moments)."""
    previous = latest_checkpoint(root)  # the unfinished step-N has no marker: never this one
    if previous is not None:
        return sum(os.path.getsize(os.path.join(previous, n)) for n in _files_of(previous))
    module = getattr(engine, "module", None)
    params = module.parameters() if module is not None else ()
    # Under ZeRO-3 a parameter holds only its shard; ds_numel is its full size.
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in params)


def _no_space(error: BaseException, root: str, step: int, needed: int) -> NoSpaceLeft | None:
    """The error to raise instead of `error` when it was the disk filling up, else None.

    OSError says so (ENOSPC, EDQUOT); torch.save only says a write came up short
    (`unexpected pos`, `file write failed`), which is the disk when less than a checkpoint
    is left free.
    """
    free = shutil.disk_usage(root).free
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = True
    else:
        short_write = any(s in str(error) for s in ("unexpected pos", "file write failed"))
        full = isinstance(error, RuntimeError) and short_write and free < needed
    if not full:
        return None
    previous = latest_checkpoint(root)
    kept = "no checkpoint exists yet"
    if previous is not None:
        kept = f"{os.path.basename(previous)} is the newest complete checkpoint"
    return NoSpaceLeft(
        f"no space left on {root} while saving step {step} (needs about {_gb(needed)}, {_gb(free)} free); "
        f"the unfinished step-{step} was removed, {kept}. Free space (or lower checkpoint.keep_last) and "
        f"resume with --resume auto"
    )


def save_checkpoint(
    engine, root: str, step: int, client_state: dict[str, Any], *, keep_last: int
) -> str:
    """Save the DeepSpeed engine as `root/step-N` from every rank, then record its files in
    the marker that makes it complete.

    Collective: every rank must call it. Returns the checkpoint folder. Raises `NoSpaceLeft`
    when the disk fills up (the folder is removed; the previous checkpoint stays).
    """
    tag = tag_for(step)
    path = os.path.join(root, tag)
    start = time.perf_counter()
    if dist.is_main():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(path):
            # A leftover of a job killed while saving this step (or an explicit resume from
            # an earlier checkpoint that now re-saves it): start from an empty folder.
            remove_checkpoint(path)
    dist.barrier()
    try:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        torch.save(capture_rng_state(), rng_state_file(path, dist.get_rank()))
        # Every rank has written its part; only now may the checkpoint count.
        dist.barrier()
        if dist.is_main():
            info = {"step": step, "world_size": dist.get_world_size(), "time": time.time()}
            mark_complete(path, {**info, "files": file_records(path)})
    except (OSError, RuntimeError) as e:
        error = _no_space(e, root, step, _checkpoint_bytes(engine, root))
        if error is None:
            raise
        if dist.is_main():
            remove_checkpoint(path)  # never complete; its space is what the disk lacks
        raise error from e
    if dist.is_main():
        deleted = prune(root, keep_last)
        logger.info(
            "saved checkpoint %s in %.1fs%s",
            path,
            time.perf_counter() - start,
            f" (deleted {', '.join(os.path.basename(d) for d in deleted)})" if deleted else "",
        )
    dist.barrier()
    return path


def _state_dict_mismatch(error: RuntimeError) -> str | None:
    """The first problem line of torch's `load_state_dict` error, or None for other errors."""
    text = str(error)
    if "Error(s) in loading state_dict" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    return lines[0] if lines else text


def load_checkpoint(engine, path: str, *, load_optimizer: bool = True) -> dict[str, Any]:
    """Load checkpoint `path` (a complete `step-N` folder) into the engine on every rank.

    DeepSpeed's loads run under `weights_only_loads()`. Returns the client state saved with
    it. The caller restores RNG state last (`load_rng_state`), after anything else that
    might draw random numbers.
    """
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete (no {COMPLETE_MARKER} marker)")
    root, tag = os.path.split(os.path.normpath(path))
    try:
        with weights_only_loads():
            loaded, client_state = engine.load_checkpoint(
                root,
                tag=tag,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=False,  # the lr is a pure function of the step
            )
    except pickle.UnpicklingError as e:
        reason = refused_global(e)
        if not reason:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CorruptCheckpointError(f"checkpoint {path} has a file that cannot be unpickled ({first})") from e
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds Python objects outside DeepSpeed's allow-list, so it is refused "
            f"(read with weights_only=True): {reason}"
        ) from e
    except RuntimeError as e:
        mismatch = _state_dict_mismatch(e)
        if mismatch is None:
            raise
        raise ModelMismatchError(
            f"checkpoint {path} does not fit this model ({mismatch}); resume it with the model settings it "
            f"was saved with"
        ) from e
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path!r}")
    return client_state or {}


def resume_state(
    engine, path: str, *, world_size: int, steps_per_epoch: int, grad_accum_steps: int
) -> TrainState:
    """Load checkpoint `path` into `engine` (collective) and return where training stands.

    The data position is per rank: on another world size it cannot be carried over
    exactly, so training continues from the same step at the start of that step's epoch
    position, and the log says the data order differs from here on.
    """
    saved = load_checkpoint(engine, path).get("marscale")
    if saved is None:
        raise ValueError(f"{path} was not written by marscale (no training state in it)")
    state = TrainState(**saved["train_state"])
    if saved["world_size"] != world_size:
        state.epoch, offset = divmod(state.step, steps_per_epoch)
        state.batch_in_epoch = offset * grad_accum_steps
        logger.warning(
            "checkpoint was written by %d ranks, resuming on %d: the data order differs from the "
            "original run from here on", saved["world_size"], world_size,
        )
    return state
