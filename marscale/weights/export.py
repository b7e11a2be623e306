"""Consolidate a DeepSpeed checkpoint of any ZeRO stage into one fp32 state dict.

- ZeRO 1, 2, 3: the fp32 master weights are spread over the ranks' optimizer shards;
  DeepSpeed's `zero_to_fp32` merges them (no process group, any machine).
- ZeRO 0: the module weights saved by rank 0 (cast to fp32; under bf16/fp16 they are the
  half-precision copy the model computed with).

`marscale export` writes ``{"model": state dict, "config": the training config, "step": N}``
with marscale's own parameter names, which `marscale.weights.pretrained.load_pretrained` detects
as its "marscale" layout and `marscale eval --checkpoint` reads.

The checkpoint is checked first (`checkpointing.find_checkpoint`: intact, every file safe
to unpickle; a run folder falls back to its newest intact checkpoint), and every file is
read with weights_only=True, DeepSpeed's `zero_to_fp32` included (`weights_only_loads`).
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

import torch

from marscale.weights.layouts import CheckpointError, load_file
from marscale.checkpoints.integrity import read_model_states, weights_only_loads
from marscale.checkpoints.folders import find_checkpoint, step_of

logger = logging.getLogger(__name__)


def has_zero_shards(path: str) -> bool:
    """Whether the checkpoint keeps its fp32 weights in ZeRO optimizer shards (stage >= 1)."""
    return bool(glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")))


def consolidate(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict, marscale client state) of the checkpoint `find_checkpoint(path)`."""
    return consolidate_checked(find_checkpoint(path))


def consolidate_checked(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`consolidate` of a `step-N` folder that `find_checkpoint` has checked (it is not
    checked again: the check hashes every file)."""
    states = read_model_states(path)
    client = states.get("marscale", {})
    if has_zero_shards(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(path))
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        state = states["module"]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    return state, client


def exported_config(path: str) -> dict[str, Any] | None:
    """The training config stored in file `path` by `marscale export`; None for a file of
    another layout. A file that is no checkpoint is a `CheckpointError` naming it."""
    obj = load_file(path, mmap=True)  # the weights are read later, by load_pretrained
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    config = obj.get("config")
    return config if isinstance(config, dict) else None


def export(checkpoint: str, out: str) -> str:
    """Write the consolidated fp32 weights of `checkpoint` (a step-N folder, a checkpoints
    folder or a run folder: the newest intact checkpoint) to `out`. Returns the folder used."""
    path = find_checkpoint(checkpoint)
    state, client = consolidate_checked(path)
    payload = {
        "model": state,
        "config": client.get("config", {}),
        "step": client.get("train_state", {}).get("step", step_of(path)),
    }
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(out)}.", suffix=".partial")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    n = sum(v.numel() for v in state.values())
    logger.info("exported %s (%d tensors, %.1fM parameters, fp32) to %s", path, len(state), n / 1e6, out)
    return path
