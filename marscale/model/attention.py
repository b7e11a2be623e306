"""Attention over the packed token layout, behind one kernel chosen when the model is built.

Shapes: Ntot packed tokens (the clips' visible tokens one after another), h heads,
d head width; q, k, v and the output are [Ntot, h, d]. A token attends to the tokens of
its own clip only (`marscale.tokens.packing.PackedTokens` says where each clip starts).

Backends (`model.attention`):
- `flash_varlen`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; if installed).
- `torch_varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16: it
  has no CPU kernel and no fp32 one).
- `flex`: FlexAttention with a document mask, compiled (`torch.compile`, dynamic shapes:
  the packed length changes every batch) into a fused kernel; called eagerly it would
  materialise the whole [h, Ntot, Ntot] score matrix. Its block mask is built once per
  batch (`PackedTokens.flex_block_mask`) and shared by every layer. On a GPU it trains;
  on a CPU it has no backward, so it only serves evaluation there.
- `sdpa_mask`: one `scaled_dot_product_attention` over the whole packed sequence with a
  block-diagonal mask (memory Ntot^2 per head: for CPU and small batches).
- `per_clip`: a loop of `scaled_dot_product_attention` calls, one per run of consecutive
  clips of equal length (batched as one rectangular call: with ratios drawn in sorted
  order, one call per distinct ratio).
- every backend: a uniform layout (all clips keep the same number of tokens: a fixed
  mask ratio, or no mask) is one rectangular `scaled_dot_product_attention` call over
  [B, h, Nv, d] (the fast path, the same call `per_clip` makes for one run).
- `auto`: on CUDA the first available of flash_varlen, torch_varlen, flex; elsewhere
  `per_clip`, the faster of the two CPU backends in every measured case
  (benchmarks/bench_packing.py, docs/benchmarks.md).

A backend that is asked for but cannot run here is an error naming what is missing, never
a silent fallback. The backend is resolved once, when the model is built for its device
(`PackedAttention`); nothing is looked up per call.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from marscale.tokens.packing import PackedTokens

AttentionBackend = Literal["auto", "flash_varlen", "torch_varlen", "flex", "sdpa_mask", "per_clip"]

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedTokens], torch.Tensor]


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` resolves to on `device`; an error if it cannot run there."""
    cuda = torch.device(device).type == "cuda"
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


HALF_ONLY = {"flash_varlen": "flash-attn", "torch_varlen": "PyTorch's varlen kernel (flash or cuDNN)"}
"""Backends whose kernels compute in fp16 or bf16 only (no fp32 kernel), and whose kernel it is."""


def training_problem(backend: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why `backend` (resolved) cannot train packed batches on `device` in `dtype`, or
    None: the one statement of each limit (the pre-flight and the kernels both use it)."""
    if backend == "flex" and torch.device(device).type == "cpu":
        return "model.attention=flex cannot train on CPU (FlexAttention has no CPU backward); use per_clip or sdpa_mask"
    if backend in HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        name = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, str(dtype).removeprefix("torch."))
        return (
            f"model.attention={backend} computes in fp16/bf16 only ({HALF_ONLY[backend]} has no {name} kernel), "
            f"this run computes in {name}: set deepspeed.precision=bf16, or model.attention=flex, sdpa_mask "
            f"or per_clip"
        )
    return None


def _runs(q, k, v, packed: PackedTokens) -> torch.Tensor:
    """One SDPA call per run of consecutive clips of equal length (one call for a uniform layout)."""
    h, d = q.shape[1:]
    outs = []
    for start, clips, length in packed.runs:
        # [clips * length, h, d] -> [clips, h, length, d]: a view, one call for the run
        qi, ki, vi = (t[start : start + clips * length].view(clips, length, h, d).transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(1, 2).reshape(clips * length, h, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _sdpa_mask(q, k, v, packed: PackedTokens) -> torch.Tensor:
    mask = packed.block_mask  # [Ntot, Ntot] block-diagonal
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """`flex_attention` compiled once per process. Dynamic shapes: packed batches change
    Ntot every step, which would otherwise recompile each new length."""
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, packed: PackedTokens) -> torch.Tensor:
    if torch.is_grad_enabled() and q.requires_grad:
        problem = training_problem("flex", q.device, q.dtype)
        if problem:
            raise RuntimeError(problem)
    # [Ntot, h, d] -> [1, h, Ntot, d]: the whole packed batch is one "document-masked" sequence
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = compiled_flex_attention()(q, k, v, block_mask=packed.flex_block_mask)
    return out[0].transpose(0, 1)


def _torch_varlen(q, k, v, packed: PackedTokens) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn  # resolve_backend checked it exists (torch >= 2.9)

    cu, m = packed.cu_seqlens.to(device=q.device, dtype=torch.int32), packed.max_seqlen
    return varlen_attn(q, k, v, cu, cu, m, m)


def _flash_varlen(q, k, v, packed: PackedTokens) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func  # optional: resolve_backend checked it is installed

    cu, m = packed.cu_seqlens.to(device=q.device, dtype=torch.int32), packed.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m)


_KERNELS: dict[str, Kernel] = {
    "per_clip": _runs,
    "sdpa_mask": _sdpa_mask,
    "flex": _flex,
    "torch_varlen": _torch_varlen,
    "flash_varlen": _flash_varlen,
}


class PackedAttention:
    """Softmax attention within each clip, with the backend `name` resolves to on `device`
    (chosen here, once). Called with q, k, v: [Ntot, h, d] -> [Ntot, h, d]."""

    def __init__(self, name: str = "auto", device: torch.device | str = "cpu"):
        self.backend = resolve_backend(name, device)
        self._kernel = _KERNELS[self.backend]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        if packed.uniform:  # every clip the same length: the rectangular fast path
            return _runs(q, k, v, packed)
        return self._kernel(q, k, v, packed)

    def __repr__(self) -> str:
        return f"PackedAttention({self.backend})"

