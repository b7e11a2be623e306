"""Consolidate a DeepSpeed checkpoint of any ZeRO stage into one fp32 state dict.

- ZeRO 1, 2, 3: the fp32 master weights are spread over the ranks' optimizer shards;
  DeepSpeed's `zero_to_fp32` merges them (no process group, any machine).
- ZeRO 0: the module weights saved by rank 0 (cast to fp32; under bf16/fp16 they are the
  half-precision copy the model computed with).

`marscale export` writes ``{"model": state dict, "config": the training config, "step": N}``
with marscale's own parameter names, which `marscale.checkpoint.load_pretrained` detects
as its "marscale" layout and `marscale eval --checkpoint` reads.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

import torch

from marscale.engine.checkpointing import find_checkpoint, step_of

logger = logging.getLogger(__name__)


def _model_states_file(path: str) -> str:
    # ZeRO 0-2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path!r} holds no DeepSpeed model states file (*model_states.pt)")


def has_zero_shards(path: str) -> bool:
    """Whether the checkpoint keeps its fp32 weights in ZeRO optimizer shards (stage >= 1)."""
    return bool(glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")))


def consolidate(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict, marscale client state) of a complete checkpoint folder `step-N`."""
    path = find_checkpoint(path)
    # DeepSpeed's own file (it pickles more than tensors); the checkpoint is the user's own.
    states = torch.load(_model_states_file(path), map_location="cpu", weights_only=False)
    client = states.get("marscale", {})
    if has_zero_shards(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(path))
        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        state = states["module"]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    return state, client


def export(checkpoint: str, out: str) -> str:
    """Write the consolidated fp32 weights of `checkpoint` (a step-N folder, a checkpoints
    folder or a run folder: the newest complete checkpoint) to `out`. Returns the folder used."""
    path = find_checkpoint(checkpoint)
    state, client = consolidate(path)
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
