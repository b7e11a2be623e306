"""Packed variable-length batches: every attention backend against each clip run alone.

For clips with different mask ratios in one batch, the packed model must give what the
model gives on each clip by itself (one clip: the rectangular fast path): logits, the
step's loss (classification per clip, reconstruction per masked token) and the
gradients, for every backend that can run here. Fixed-ratio batches (one run: the fast
path for the whole batch) give the same numbers as each clip alone.
"""

import dataclasses
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from marscale.engine.loss import build_loss
from marscale.tokens.masking import MaskingConfig, cell_running_mask, make_mask, random_mask
from marscale.model import build_model
from marscale.model.attention import PackedAttention, resolve_backend
from marscale.model.layers import Attention
from marscale.tokens import packing
from marscale.tokens.packing import pack_mask
from tests.helpers import tiny_clip, tiny_model_config

CLIP = tiny_clip(img_size=64)  # 2 x 4 x 4 = 32 tokens
GRID = (2, 4, 4)
CPU_TRAINING_BACKENDS = ["per_clip", "sdpa_mask"]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(**kw), CLIP).train()


def _batch(ratios, seed=1):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(len(ratios), 3, CLIP.num_frames, CLIP.img_size, CLIP.img_size, generator=g)
    labels = torch.randint(0, 5, (len(ratios),), generator=g)
    mask = cell_running_mask(len(ratios), GRID, ratios, g)
    return video, labels, mask


def _reference(model, loss_fn, video, labels, mask):
    """Each clip alone (the rectangular fast path); losses combined as the packed batch
    weighs them (per clip / per masked token over the batch). Returns logits, loss, grads."""
    model.zero_grad()
    masked_total = int(mask.sum())
    logits, total = [], 0.0
    for b in range(video.shape[0]):
        alone = pack_mask(mask[b : b + 1])
        assert alone.uniform
        out = model(video[b : b + 1], alone)
        parts = loss_fn(out, video[b : b + 1], alone, labels[b : b + 1])
        share = alone.num_masked / masked_total
        loss = parts["loss_cls"] / video.shape[0]
        if share:  # a clip masked at 0% reconstructs nothing
            loss = loss + loss_fn.recon_weight * share * parts["loss_recon"]
        loss.backward()
        total += float(loss.detach())
        logits.append(out["logits"].detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), total, grads


def _packed(model, loss_fn, video, labels, mask):
    model.zero_grad()
    packed = pack_mask(mask)
    out = model(video, packed)
    parts = loss_fn(out, video, packed, labels)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["logits"].detach(), float(parts["loss"]), grads


@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
def test_packed_matches_each_clip_alone(backend):
    model = _model(attention=backend)
    loss_fn = build_loss(CLIP, 16, recon_weight=1.0)
    video, labels, mask = _batch([0.25, 0.75, 0.5, 0.75, 0.0])
    assert sorted(pack_mask(mask).lengths) == [8, 8, 16, 24, 32]  # really different lengths
    ref_logits, ref_loss, ref_grads = _reference(model, loss_fn, video, labels, mask)
    logits, loss, grads = _packed(model, loss_fn, video, labels, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flex_forward_matches_on_cpu(monkeypatch):
    """FlexAttention runs forward on CPU (no backward there): evaluation logits agree. It
    runs compiled (eager flex warns that it materialises the score matrix), and one block
    mask serves every layer of a forward."""
    built = []
    monkeypatch.setattr(packing, "create_block_mask", lambda *a, **k: built.append(a[3]) or create_block_mask(*a, **k))
    ref = _model(attention="per_clip").eval()
    flex = _model(attention="flex").eval()
    assert len(flex.encoder.blocks) > 1
    for ratios in ([0.25, 0.75, 0.5], [0.5, 0.0]):  # a second packed length: no recompilation error
        video, _, mask = _batch(ratios)
        packed = pack_mask(mask)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*without torch.compile")
            expected = ref(video, pack_mask(mask))["logits"]
            got = flex(video, packed)["logits"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert built == [24 + 8 + 16, 16 + 32]  # one mask per batch, of its packed length


def test_flex_refuses_to_train_on_cpu():
    video, labels, mask = _batch([0.25, 0.75])
    model = _model(attention="flex")
    with pytest.raises(RuntimeError, match="no CPU backward"):
        model(video, pack_mask(mask))


@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
def test_fixed_ratio_packed_equals_rectangular(backend):
    """A fixed-ratio batch is one run: the fast path for the whole batch, whatever the
    backend, gives each clip's numbers alone (dtype tolerance)."""
    model = _model(attention=backend)
    loss_fn = build_loss(CLIP, 16, recon_weight=1.0)
    video, labels, mask = _batch([0.5] * 4)
    assert pack_mask(mask).uniform
    ref_logits, ref_loss, ref_grads = _reference(model, loss_fn, video, labels, mask)
    logits, loss, grads = _packed(model, loss_fn, video, labels, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_kernel_is_chosen_once_and_uniform_batches_take_the_fast_path(monkeypatch):
    model = _model(attention="sdpa_mask")
    kernels = {id(m.attend) for m in model.modules() if isinstance(m, Attention)}
    assert len(kernels) == 1  # one PackedAttention, resolved when the model was built
    attend = next(m.attend for m in model.modules() if isinstance(m, Attention))
    assert attend.backend == "sdpa_mask"
    calls = []
    monkeypatch.setattr(attend, "_kernel", lambda *a: calls.append(1) or PackedAttention("per_clip")(*a))
    video, _, mask = _batch([0.5, 0.5])
    with torch.no_grad():
        model.eval()(video, pack_mask(mask))
    assert calls == []  # uniform: the fast path, not the backend
    video, _, mask = _batch([0.25, 0.5])
    with torch.no_grad():
        model(video, pack_mask(mask))
    assert len(calls) == len(model.encoder.blocks) + len(model.classifier.blocks)


def test_vit_baseline_packed():
    """The full-token baseline evaluated on packed masked clips: each clip as alone."""
    model = _model(arch="vit", attention="sdpa_mask").eval()
    video, _, mask = _batch([0.25, 0.75, 0.5])
    with torch.no_grad():
        got = model(video, pack_mask(mask))["logits"]
        want = torch.cat([model(video[b : b + 1], pack_mask(mask[b : b + 1]))["logits"] for b in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_clips_when_packed():
    """Stochastic depth on a packed row drops per clip, with the rectangular batch's draws."""
    from marscale.model.layers import DropPath

    dp = DropPath(0.5).train()
    mask = cell_running_mask(6, GRID, [0.25, 0.75, 0.5, 0.5, 0.0, 0.75], torch.Generator().manual_seed(0))
    packed = pack_mask(mask)
    x = torch.ones(packed.total, 4)
    torch.manual_seed(3)
    out = dp(x, packed)
    torch.manual_seed(3)
    rect = torch.ones(6, 1, 4) * torch.empty(6).bernoulli_(0.5).view(6, 1, 1) / 0.5  # a [B, N, D] batch's draws
    for b, tokens in enumerate(packed.split(out)):
        assert torch.all(tokens == rect[b, 0, 0])


def test_pack_mask_layout():
    mask = random_mask(3, GRID, [0.25, 0.5, 0.75], torch.Generator().manual_seed(0))
    packed = pack_mask(mask)
    assert packed.lengths == (24, 16, 8) and packed.max_seqlen == 24 and packed.num_masked == 48
    assert packed.cu_seqlens.tolist() == [0, 24, 40, 48]
    for b in range(3):
        vis = (~mask[b]).nonzero().flatten()
        assert torch.equal(packed.visible_idx[packed.clip_ids == b], vis)
        assert torch.equal(packed.order[b, : packed.lengths[b]], vis)
        assert torch.equal(packed.masked_idx[packed.masked_clip_ids == b], mask[b].nonzero().flatten())
    with pytest.raises(ValueError, match="at least one visible"):
        pack_mask(torch.ones(2, 8, dtype=torch.bool))


def test_backend_errors_name_what_is_missing():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "per_clip"
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        resolve_backend("torch_varlen", cpu)
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("flash_varlen", cpu)


def test_per_clip_masks_keep_their_ratio():
    cfg = MaskingConfig(ratio=[0.25, 0.5, 0.75], eval_ratio=0.5)
    ratios = [0.75, 0.25, 0.5, 0.5]
    mask = make_mask(cfg, 4, GRID, torch.Generator().manual_seed(0), train=True, ratios=ratios)
    assert mask.sum(dim=1).tolist() == [24, 8, 16, 16]
    # Each cell of each time slice masks ratio x 4 of its 4 slots.
    cells = mask.view(4, 2, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(4, 2, 4, 4)
    for b, r in enumerate(ratios):
        assert torch.all(cells[b].sum(-1) == int(r * 4))
    # The draws of the generator do not depend on the ratios: same phase and shuffle.
    fixed = make_mask(dataclasses.replace(cfg, ratio=0.5), 4, GRID, torch.Generator().manual_seed(0))
    assert torch.equal(mask[2:], fixed[2:])
