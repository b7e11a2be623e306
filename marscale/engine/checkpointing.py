"""DeepSpeed checkpoints that count only once complete, resume selection, and RNG state.

Layout of a run's checkpoints::

    <output_dir>/checkpoints/
        step-1000/          DeepSpeed's files (model states, ZeRO shards of every rank)
            rng_state_rank0.pt, rng_state_rank1.pt, ...   python/numpy/torch RNG per rank
            COMPLETE        written last, atomically, by the main rank
        step-2000/ ...

Invariant: a folder is a checkpoint only if `COMPLETE` exists in it. Every rank saves,
then all ranks meet at a barrier, and only then does the main rank write the marker.
A job killed while saving leaves a folder without the marker, which resume ignores (it
falls back to the newest complete one) and a later save of the same step replaces.
DeepSpeed's own `latest` file is not written: it would name a checkpoint before it is
complete.

Old checkpoints are deleted by the main rank after the new one is complete: the marker
first (so a folder half-deleted by a crash is simply incomplete), then the files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch

from marscale import dist
from marscale.io import write_json

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
_TAG = re.compile(r"step-(\d+)")


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


def find_checkpoint(path: str) -> str:
    """A complete checkpoint folder from `path`: the folder itself (`.../step-N`), or the
    newest complete one under a checkpoints folder or a run's output folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if step_of(path) is not None:
        if not is_complete(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} is incomplete (no {COMPLETE_MARKER} marker: the job stopped while "
                f"saving it); use an earlier step-N folder"
            )
        return path
    for root in (path, checkpoints_root(path)):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no complete step-N checkpoint in {path!r} or {checkpoints_root(path)!r}")


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint to resume from for `checkpoint.resume`.

    "" -> None (start fresh); "auto" -> the newest complete checkpoint of this run, or
    None when there is none yet (the first start of a job that is requeued later);
    anything else is a path for `find_checkpoint`, which must exist.
    """
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints_root(output_dir))
    return find_checkpoint(resume)


# --- RNG state ------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global random stream the training step draws from, for this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_state_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_state_rank{rank}.pt")


def load_rng_state(path: str, rank: int) -> bool:
    """Restore this rank's RNG state from checkpoint `path`; False if the file is absent
    (a checkpoint written by fewer ranks)."""
    file = rng_state_file(path, rank)
    if not os.path.isfile(file):
        return False
    # Our own file: python's and numpy's states are tuples, not tensors.
    restore_rng_state(torch.load(file, map_location="cpu", weights_only=False))
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


def save_checkpoint(
    engine, root: str, step: int, client_state: dict[str, Any], *, keep_last: int
) -> str:
    """Save the DeepSpeed engine as `root/step-N` from every rank, then mark it complete.

    Collective: every rank must call it. Returns the checkpoint folder.
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
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    torch.save(capture_rng_state(), rng_state_file(path, dist.get_rank()))
    # Every rank has written its part; only now may the checkpoint count.
    dist.barrier()
    if dist.is_main():
        mark_complete(path, {"step": step, "world_size": dist.get_world_size(), "time": time.time()})
        deleted = prune(root, keep_last)
        logger.info(
            "saved checkpoint %s in %.1fs%s",
            path,
            time.perf_counter() - start,
            f" (deleted {', '.join(os.path.basename(d) for d in deleted)})" if deleted else "",
        )
    dist.barrier()
    return path


def load_checkpoint(engine, path: str, *, load_optimizer: bool = True) -> dict[str, Any]:
    """Load checkpoint `path` (a complete `step-N` folder) into the engine on every rank.

    Returns the client state saved with it. The caller restores RNG state last
    (`load_rng_state`), after anything else that might draw random numbers.
    """
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete (no {COMPLETE_MARKER} marker)")
    root, tag = os.path.split(os.path.normpath(path))
    loaded, client_state = engine.load_checkpoint(
        root,
        tag=tag,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=False,  # the lr is a pure function of the step
    )
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
