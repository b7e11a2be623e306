"""The random state of a training process, saved per rank with every checkpoint and restored
bit for bit on resume (Python's, numpy's and torch's generators), as ints, floats and
tensors only, so the files load with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from marscale.checkpoints.integrity import load_checkpoint_file

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


def rng_state_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_state_rank{rank}.pt")


def load_rng_state(path: str, rank: int) -> bool:
    """Restore this rank's RNG state from checkpoint `path`; False if the file is absent
    (a checkpoint written by fewer ranks)."""
    file = rng_state_file(path, rank)
    if not os.path.isfile(file):
        return False
    restore_rng_state(load_checkpoint_file(file))
    return True
