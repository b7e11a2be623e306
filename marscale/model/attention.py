"""Attention over packed variable-length sequences, behind one function with several backends.

Shapes: Ntot packed tokens (the clips' visible tokens one after another), h heads,
d head width; q, k, v and the output are [Ntot, h, d]. A token attends to the tokens of
its own clip only (`marscale.tokens.packing.PackedTokens` says where each clip starts).

Backends (`model.attention`):
- `flash_varlen`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; if installed).
- `torch_varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA only: it has no
  CPU kernel).
- `flex`: FlexAttention with a document mask. On a GPU it trains; on a CPU it has no
  backward, so it only serves evaluation there.
- `sdpa_mask`: one `scaled_dot_product_attention` over the whole packed sequence with a
  block-diagonal mask (memory Ntot^2 per head: for CPU and small batches).
- `per_clip`: a loop of `scaled_dot_product_attention` calls, one per run of consecutive
  clips of equal length (batched as one rectangular call: with ratios drawn in sorted
  order, one call per distinct ratio).
- `auto`: on CUDA the first available of flash_varlen, torch_varlen, flex; elsewhere
  `per_clip`, the faster of the two CPU backends in every measured case
  (benchmarks/bench_packing.py, docs/benchmarks.md).

A backend that is asked for but cannot run here is an error naming what is missing, never
a silent fallback.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from marscale.tokens.packing import PackedTokens

AttentionBackend = Literal["auto", "flash_varlen", "torch_varlen", "flex", "sdpa_mask", "per_clip"]


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend `name` resolves to on `device`; an error if it cannot run there."""
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda:
            if _has_flash_attn():
                return "flash_varlen"
            return "torch_varlen" if _has_torch_varlen() else "flex"
        return "per_clip"
    if name == "flash_varlen":
        if not cuda:
            raise RuntimeError("model.attention=flash_varlen needs a CUDA device (flash-attn has no CPU kernel)")
        if not _has_flash_attn():
            raise RuntimeError(
                "model.attention=flash_varlen but flash-attn is not installed (pip install flash-attn); "
                "or set model.attention=auto"
            )
    elif name == "torch_varlen":
        if not _has_torch_varlen():
            raise RuntimeError(
                f"model.attention=torch_varlen needs torch.nn.attention.varlen (PyTorch >= 2.9), "
                f"this is {torch.__version__}; set model.attention=auto"
            )
        if not cuda:
            raise RuntimeError("model.attention=torch_varlen has no CPU kernel; on CPU use per_clip or sdpa_mask")
    return name


def _flex(q, k, v, packed: PackedTokens) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "model.attention=flex cannot train on CPU (FlexAttention has no CPU backward); "
            "use per_clip or sdpa_mask there"
        )
    ids = packed.clip_ids

    def same_clip(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    n = q.shape[0]
    block_mask = create_block_mask(same_clip, None, None, n, n, device=q.device)
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
    return out[0].transpose(0, 1)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens, backend: str
) -> torch.Tensor:
    """Softmax attention within each clip. q, k, v: [Ntot, h, d] -> [Ntot, h, d]."""
    backend = resolve_backend(backend, q.device)
    if backend == "per_clip":
        h, d = q.shape[1:]
        outs = []
        for start, clips, length in packed.runs:
            # [clips * length, h, d] -> [clips, h, length, d]: a view, one call for the run
            qi, ki, vi = (t[start : start + clips * length].view(clips, length, h, d).transpose(1, 2) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(1, 2).reshape(clips * length, h, d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    if backend == "sdpa_mask":
        mask = packed.block_mask  # [Ntot, Ntot] block-diagonal
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return out.transpose(0, 1)
    if backend == "flex":
        return _flex(q, k, v, packed)
    cu = packed.cu_seqlens.to(device=q.device, dtype=torch.int32)
    m = packed.max_seqlen
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, m, m)
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, m, m)
