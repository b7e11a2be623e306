"""The CUDA-only attention backends (marscale.model.attention: flash_varlen, torch_varlen)
through the real model on the CPU, with stand-ins for their kernels.

`flash_attn_varlen_func` (flash-attn 2) and `torch.nn.attention.varlen.varlen_attn` have
no CPU kernel, so the fast suite replaces them with functions of the same signature that
first check what the real kernels require, then compute the reference (one SDPA call per
sequence):

    q, k, v       [Ntot, heads, head_dim], one dtype, fp16 or bf16 only ("FlashAttention
                  only supports fp16 and bf16"), last dimension contiguous (flash-attn's
                  wrapper and PyTorch's both check stride(-1) == 1; the model passes views
                  of its qkv projection, which have it)
    head_dim      a multiple of 8, at most 256
    cu_seqlens    int32, 1-D, contiguous, on q's device; 0 first, Ntot last, non-decreasing
    max_seqlen    a host int (the kernels size their launch grid from it, no device read),
                  equal to the longest sequence (a smaller one silently drops tokens)

A backend's plumbing (layout, cu_seqlens, max_seqlen, dtype, the kernel chosen once) is
then checked against the per_clip backend on the same weights: logits and gradients.
With CUDA the same comparison runs the real kernels (`test_real_kernels_train_as_per_clip`,
marked gpu).
"""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from marscale.engine.loss import build_loss
from marscale.model import attention, build_model
from marscale.tokens.masking import cell_running_mask
from marscale.tokens.packing import pack_mask
from tests.helpers import tiny_clip, tiny_model_config

CLIP = tiny_clip(img_size=64)  # 2 x 4 x 4 = 32 tokens
GRID = (2, 4, 4)
RATIOS = [0.25, 0.75, 0.5, 0.75, 0.0]  # sequences of 24, 8, 16, 8 and 32 tokens


def _check_and_attend(q, k, v, cu_q, cu_k, max_q, max_k, calls: list) -> torch.Tensor:
    """What both varlen kernels require of their inputs, then the reference result."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16 data type ({name} is {t.dtype})")
        if t.dim() != 3 or t.shape != q.shape:
            raise RuntimeError(f"{name} must be [total, heads, head_dim] like q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise RuntimeError(f"{name}: input tensor must have contiguous last dimension")
        if t.dtype != q.dtype:
            raise RuntimeError("query, key and value must have the same dtype")
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise RuntimeError(f"head dimension must be a multiple of 8 and at most 256, got {head_dim}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{name} must have dtype int32, got {cu.dtype}")
        if cu.device != q.device:
            raise RuntimeError(f"{name} must be on {q.device}, got {cu.device}")
        if cu.dim() != 1 or not cu.is_contiguous():
            raise RuntimeError(f"{name} must be a contiguous 1-D tensor")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(m, int) or isinstance(m, bool):
            raise RuntimeError(f"{name} must be a host int, got {type(m).__name__}")
    bounds = cu_q.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and min(lengths) >= 0, bounds
    assert cu_k.tolist() == bounds  # self-attention within each clip
    assert max_q == max_k == max(lengths), (max_q, max_k, lengths)
    calls.append(lengths)
    outs = [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outs)


def make_flash_attn_varlen_func(calls: list):
    """flash-attn 2's signature (flash_attn/flash_attn_interface.py)."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        assert dropout_p == 0.0 and softmax_scale is None and not causal and not return_attn_probs
        return _check_and_attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, calls)

    return flash_attn_varlen_func


def make_varlen_attn(calls: list):
    """PyTorch's signature (torch/nn/attention/varlen.py; test_stand_in_signatures)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        assert return_aux is None and scale is None and not enable_gqa
        return _check_and_attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, calls)

    return varlen_attn


@pytest.fixture
def kernels(monkeypatch):
    """Both stand-ins in place of the real kernels (where attention.py imports them from),
    flash-attn reported installed; returns the list each call appends its lengths to."""
    calls: list = []
    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = make_flash_attn_varlen_func(calls)
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)
    monkeypatch.setattr(attention, "_has_flash_attn", lambda: True)
    if attention._has_torch_varlen():
        import torch.nn.attention.varlen as varlen

        monkeypatch.setattr(varlen, "varlen_attn", make_varlen_attn(calls))
    return calls


def _backends() -> list:
    torch_varlen = pytest.param("torch_varlen", marks=pytest.mark.skipif(
        not attention._has_torch_varlen(), reason="torch.nn.attention.varlen needs PyTorch >= 2.9"))
    return ["flash_varlen", torch_varlen]


def test_stand_in_signatures():
    """The stand-in for PyTorch's kernel takes exactly its parameters (flash-attn's is
    written from its source: not installable without CUDA)."""
    if not attention._has_torch_varlen():
        pytest.skip("torch.nn.attention.varlen needs PyTorch >= 2.9")
    from torch.nn.attention.varlen import varlen_attn

    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(make_varlen_attn([])) == shape(varlen_attn)


def _model(backend: str | None, dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention="per_clip"), CLIP).to(device, dtype).train()
    if backend:
        model.set_attention(backend, "cuda")  # resolved for a CUDA device (runs on the CPU with stand-ins)
    return model


def _step(model, dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    video = torch.randn(len(RATIOS), 3, CLIP.num_frames, CLIP.img_size, CLIP.img_size, generator=g)
    video = video.to(device, dtype)
    labels = torch.randint(0, 5, (len(RATIOS),), generator=g).to(device)
    packed = pack_mask(cell_running_mask(len(RATIOS), GRID, RATIOS, g).to(device))
    out = model(video, packed)
    parts = build_loss(CLIP, 16, recon_weight=1.0)(out, video, packed, labels)
    parts["loss"].backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out["logits"].detach().float(), grads


@pytest.mark.parametrize("backend", _backends())
def test_varlen_backend_trains_as_per_clip(kernels, backend):
    """Packed clips of four lengths through the backend's kernel, in bf16: every packed
    block calls it once with the batch's sequences, and logits and gradients are
    per_clip's (fp16 takes the same path; the CPU runs it far slower)."""
    dtype = torch.bfloat16
    model = _model(backend, dtype)
    attend = next(m.attend for m in model.modules() if hasattr(m, "attend"))
    assert attend.backend == backend and attend._kernel is attention._KERNELS[backend]
    logits, grads = _step(model, dtype)
    # the encoder's blocks and the classifier's run packed; the decoder's input is rectangular
    packed_blocks = len(model.encoder.blocks) + len(model.classifier.blocks)
    assert kernels == [[24, 8, 16, 8, 32]] * packed_blocks
    ref_logits, ref_grads = _step(_model(None, dtype), dtype)
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _backends())
def test_real_kernels_train_as_per_clip(backend):
    """The comparison above with the real kernels (flash_varlen: where flash-attn is installed)."""
    if backend == "flash_varlen" and not attention._has_flash_attn():
        pytest.skip("flash-attn is not installed")
    logits, grads = _step(_model(backend, torch.bfloat16, "cuda"), torch.bfloat16, "cuda")
    ref_logits, ref_grads = _step(_model(None, torch.bfloat16, "cuda"), torch.bfloat16, "cuda")
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("backend", _backends())
def test_varlen_backend_in_fp32_fails_as_the_kernel_does(kernels, backend):
    """What the pre-flight refuses before the first step (attention.training_problem)."""
    with pytest.raises(RuntimeError, match="only supports fp16 and bf16"):
        _step(_model(backend, torch.float32), torch.float32)
    assert "fp16/bf16 only" in attention.training_problem(backend, "cuda", torch.float32)


@pytest.mark.parametrize("bad, message", [
    (dict(cu=torch.tensor([0, 3, 5], dtype=torch.int64)), "must have dtype int32"),
    (dict(m=torch.tensor(3)), "must be a host int"),
    (dict(head_dim=12), "multiple of 8"),
    (dict(head_dim=264), "at most 256"),
    (dict(dtype=torch.float32), "only supports fp16 and bf16"),
    (dict(transposed=True), "contiguous last dimension"),
])
def test_the_stand_ins_refuse_what_the_kernels_refuse(bad, message):
    """The checks above mean something: each broken input is refused by both stand-ins."""
    head_dim, dtype = bad.get("head_dim", 16), bad.get("dtype", torch.bfloat16)
    q = torch.randn(5, 2, head_dim, dtype=dtype)
    if bad.get("transposed"):
        q = torch.randn(5, head_dim, 2, dtype=dtype).transpose(1, 2)
    cu, m = bad.get("cu", torch.tensor([0, 3, 5], dtype=torch.int32)), bad.get("m", 3)
    for fn in (make_flash_attn_varlen_func([]), make_varlen_attn([])):
        with pytest.raises(RuntimeError, match=message):
            fn(q, q, q, cu, cu, m, m)
