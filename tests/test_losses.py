"""Tests for marscale.engine.loss: patch layout, reconstruction target, classification and total loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tokens_of

from marscale.engine.loss import (
    classification_loss,
    masked_mse,
    normalized_pixel_target,
    patchify,
    soft_target_cross_entropy,
)
from marscale.engine.loss import MARLoss, build_loss
from marscale.tokens.packing import PackedTokens

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _clip_and_masked(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, PackedTokens]:
    """A [B, 3, 4, 8, 8] clip (tubelet 2, patch 4: 8 tokens) and its layout with 6 masked
    tokens per clip."""
    video = torch.randn(batch, 3, 4, 8, 8, generator=generator)
    visible = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(batch)])
    return video, tokens_of(visible, 8)


def test_patchify_matches_a_loop():
    B, C, T, H, W, tub, p = 2, 3, 4, 8, 12, 2, 4
    video = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(0))
    out = patchify(video, tub, p)
    t_, h_, w_ = T // tub, H // p, W // p
    assert out.shape == (B, t_ * h_ * w_, tub * p * p, C)
    expected = torch.empty_like(out)
    for b in range(B):
        for t in range(t_):
            for y in range(h_):
                for x in range(w_):
                    n = (t * h_ + y) * w_ + x
                    for dt in range(tub):
                        for dy in range(p):
                            for dx in range(p):
                                k = (dt * p + dy) * p + dx
                                expected[b, n, k, :] = video[b, :, t * tub + dt, y * p + dy, x * p + dx]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_normalized_pixel_target_by_hand():
    B, C, T, H, W, tub, p = 2, 3, 2, 4, 4, 2, 2
    g = torch.Generator().manual_seed(1)
    video = torch.randn(B, C, T, H, W, generator=g)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    masked_idx = torch.tensor([[0, 3], [1, 2]])  # the layout holds each clip's masked tokens ascending
    visible_idx = torch.tensor([[1, 2], [0, 3]])
    target = normalized_pixel_target(video, tokens_of(visible_idx, 4),
                                     tub, p, mean, std).view(B, 2, -1)
    assert target.shape == (B, 2, tub * p * p * C)
    for b in range(B):
        for j, n in enumerate(masked_idx[b].tolist()):
            y, x = divmod(n, W // p)
            for c in range(C):
                pix = video[b, c, :, y * p : (y + 1) * p, x * p : (x + 1) * p] * std[c] + mean[c]
                vals = pix.flatten().tolist()  # (frame, row, col) order, 8 values
                mu = sum(vals) / len(vals)
                sd = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5  # unbiased
                want = torch.tensor([(v - mu) / (sd + 1e-6) for v in vals])
                torch.testing.assert_close(target[b, j, c::C], want, rtol=1e-5, atol=1e-5)


def test_soft_target_ce_equals_cross_entropy_for_one_hot():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2, 3])
    one_hot = F.one_hot(labels, 7).float()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    smooth = one_hot * 0.9 + 0.1 / 7
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, smooth), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    # A genuinely mixed target (mixup of two labels): -sum(t * log softmax).
    mixed = 0.3 * one_hot + 0.7 * F.one_hot(labels.flip(0), 7).float()
    want = -(mixed * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(soft_target_cross_entropy(logits, mixed), want)


def test_classification_loss_dispatch_and_dtype():
    logits = torch.randn(4, 3, dtype=torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 1])
    hard = classification_loss(logits, labels)
    soft = classification_loss(logits, F.one_hot(labels, 3).float())
    assert hard.dtype == torch.float32 and soft.dtype == torch.float32
    torch.testing.assert_close(hard, F.cross_entropy(logits.float(), labels))
    torch.testing.assert_close(soft, hard)


def test_masked_mse():
    pred, target = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(masked_mse(pred, target), ((pred - target) ** 2).mean())


@pytest.mark.parametrize("w", [0.01, 0.1])
def test_total_loss_weighting(w):
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(4, 5, generator=g), torch.tensor([1, 0, 4, 2])
    video, masked = _clip_and_masked(4, g)
    pred = torch.randn(4 * 6, 96, generator=g)
    out = MARLoss(2, 4, MEAN, STD, w)({"logits": logits, "pred": pred}, video, masked, labels)
    target = normalized_pixel_target(video, masked, 2, 4, MEAN, STD)  # built from the clip the model saw
    ce, mse = F.cross_entropy(logits, labels), ((pred - target) ** 2).mean()
    torch.testing.assert_close(out["loss_cls"], ce)
    torch.testing.assert_close(out["loss_recon"], mse)
    torch.testing.assert_close(out["loss"], ce + w * mse)


def test_total_loss_without_reconstruction():
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    video, masked = _clip_and_masked(2, torch.Generator().manual_seed(0))
    loss = MARLoss(2, 4, MEAN, STD, 0.1)
    only_cls = loss({"logits": logits}, video, None, labels)
    assert set(only_cls) == {"loss", "loss_cls"}
    torch.testing.assert_close(only_cls["loss"], F.cross_entropy(logits, labels))
    outputs = {"logits": logits, "pred": torch.ones(2 * 6, 96)}
    off = MARLoss(2, 4, MEAN, STD, 0.0)(outputs, video, masked, labels)
    assert "loss_recon" not in off
    torch.testing.assert_close(off["loss"], F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="no token layout"):
        loss(outputs, video, None, labels)


def test_total_loss_backpropagates_to_both_terms():
    logits = torch.randn(2, 3, requires_grad=True)
    video, masked = _clip_and_masked(2, torch.Generator().manual_seed(1))
    target = normalized_pixel_target(video, masked, 2, 4, MEAN, STD)
    pred = (target + torch.randn(target.shape)).requires_grad_(True)
    out = MARLoss(2, 4, MEAN, STD, 0.5)({"logits": logits, "pred": pred}, video, masked, torch.tensor([0, 1]))
    out["loss"].backward()
    # d(0.5 * mean((pred - target)^2)) / d pred = (pred - target) / numel.
    torch.testing.assert_close(pred.grad, (pred.detach() - target) / target.numel())
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert video.grad is None  # the target carries no gradient


def test_build_loss_reads_the_clip_section():
    from marscale.core.clip import ClipConfig

    clip = ClipConfig(num_frames=8, img_size=64, tubelet_size=4, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4))
    assert build_loss(clip, patch_size=16, recon_weight=0.3) == MARLoss(4, 16, (0.5, 0.5, 0.5), (0.2, 0.3, 0.4), 0.3)
