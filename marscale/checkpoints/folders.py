"""DeepSpeed checkpoints that count only once complete, load only when intact and never run
code from their files; resume selection. (The integrity checks are in
`integrity.py`, the random state in `rng_state.py`.)

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
(`marscale.weights.layouts.load_file`). The RNG files hold only ints, floats and
tensors (`capture_rng_state`). DeepSpeed's files hold a few of DeepSpeed's own classes
beside tensors: those and nothing else are allowed (`marscale.weights.layouts.DEEPSPEED_GLOBALS`);
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

import dataclasses
import errno
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import torch

from marscale.core import dist
from marscale.weights.layouts import CorruptCheckpointError, UnsafeCheckpointError, refused_global
from marscale.checkpoints.integrity import (
    COMPLETE_MARKER,
    DAMAGED_MARKER,
    ModelMismatchError,
    files_of,
    check_checkpoint,
    file_records,
    mark_damaged,
    weights_only_loads,
)
from marscale.checkpoints.reshape import prune_conversions
from marscale.checkpoints.rng_state import capture_rng_state, rng_state_file
from marscale.core.io import write_json

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
_TAG = re.compile(r"step-(\d+)")
class NoSpaceLeft(RuntimeError):
    """A checkpoint could not be written for lack of disk space (or quota). The message
    names the folder, the step and about how much space a checkpoint takes."""


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


def client_state(
    state: TrainState, world_size: int, config: dict[str, Any], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """What marscale stores beside DeepSpeed's files: the training state, the world size
    it was written on, the effective config and the class names by label (the shard
    manifest's: the weights name their classes wherever they are copied, without the shards)."""
    return {"marscale": {
        "train_state": dataclasses.asdict(state), "world_size": world_size, "config": config,
        "class_names": None if class_names is None else list(class_names),
    }}


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


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint to resume from for `checkpoint.resume` (collective: the main rank
    checks, every rank gets its answer or raises its error).

    "" -> None (start fresh); "auto" -> the newest intact checkpoint of this run, or None
    when there is none yet (the first start of a job that is requeued later); anything
    else is a path for `find_checkpoint`, which must exist. Damaged checkpoints of this
    run are marked `DAMAGED` on the way. (Whether this run's config may continue it is
    `marscale.engine.resume_config.check_resume_config`, which the trainer runs on the answer.)
    """
    if not resume:
        return None
    return dist.decided_on_main(_resolve_resume, resume, output_dir)


def _resolve_resume(resume: str, output_dir: str) -> str | None:
    own = checkpoints_root(output_dir)
    if resume == "auto":
        if not list_checkpoints(own):
            return None
        return find_checkpoint(own, demote_under=own)
    return find_checkpoint(resume, demote_under=own)


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
    incomplete leftovers older than the newest complete one, and universal conversions of
    checkpoints that are gone (`reshape.prune_conversions`). Returns what was deleted."""
    complete = list_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for s, p in list_checkpoints(root, complete=False) if s < newest]
    if keep_last > 0:
        doomed += [p for _, p in complete[:-keep_last]]
    for path in doomed:
        remove_checkpoint(path)
    return doomed + prune_conversions(root)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2g} GB"


def checkpoint_bytes(num_params: int, precision: str, zero_stage: int) -> int:
    """Bytes of one DeepSpeed checkpoint, all ranks' files together, of `num_params`
    parameters trained with AdamW.

    The files DeepSpeed writes (measured on CPU: 12.0, 14.0, 14.0, 16.0 and 12.0 bytes a
    parameter for ZeRO-0 fp32, ZeRO-0 bf16, ZeRO-1 bf16, ZeRO-2 fp32 and ZeRO-3 bf16):
    the module's weights in the training dtype (4 bytes in fp32, 2 in bf16/fp16; none
    under ZeRO-3, where the optimizer files hold the partitions); AdamW's two fp32
    moments (8); fp32 master weights (4) wherever DeepSpeed wraps the optimizer (mixed
    precision or ZeRO >= 1), while a bare torch optimizer (ZeRO-0 in fp32) has none: the
    module is its master copy. Metadata and RNG states add kilobytes.
    """
    module = 0 if zero_stage == 3 else (4 if precision == "fp32" else 2)
    master = 0 if zero_stage == 0 and precision == "fp32" else 4
    return num_params * (module + master + 8)


def _checkpoint_bytes(engine, root: str) -> int:
    """About how much a checkpoint takes: the newest other complete one, else
    `checkpoint_bytes` for the engine's parameters, precision and ZeRO stage."""
    previous = latest_checkpoint(root)  # the unfinished step-N has no marker: never this one
    if previous is not None:
        return sum(os.path.getsize(os.path.join(previous, n)) for n in files_of(previous))
    module = getattr(engine, "module", None)
    params = module.parameters() if module is not None else ()
    # Under ZeRO-3 a parameter holds only its shard; ds_numel is its full size.
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    precision = "bf16" if _enabled(engine, "bf16_enabled") else "fp16" if _enabled(engine, "fp16_enabled") else "fp32"
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    return checkpoint_bytes(num_params, precision, int(stage or 0))


def _enabled(engine, method: str) -> bool:
    return bool(getattr(engine, method, lambda: False)())


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
            f" (deleted {', '.join(os.path.relpath(d, root) for d in deleted)})" if deleted else "",
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
    engine, path: str, *, steps_per_epoch: int, grad_accum_steps: int
) -> TrainState:
    """Load checkpoint `path` into `engine` (collective) and return where training stands.

    The data position (epoch, batch in epoch) is where this run's plan puts the saved
    step. With the batches of the run that saved it, that is the saved position itself
    (a step ends every `grad_accum_steps` batches, an epoch every `steps_per_epoch` steps).
    On another world size, batch size, accumulation or epoch length the saved position
    means other samples, or lies past this run's epoch: training continues from the same
    step, and the log says the data order differs from here on (`reshape.plan_resume`,
    `marscale.engine.resume_config`).
    """
    saved = load_checkpoint(engine, path).get("marscale")
    if saved is None:
        raise ValueError(f"{path} was not written by marscale (no training state in it)")
    state = TrainState(**saved["train_state"])
    state.epoch, offset = divmod(state.step, steps_per_epoch)
    state.batch_in_epoch = offset * grad_accum_steps
    return state
