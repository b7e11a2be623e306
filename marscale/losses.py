"""Loss functions and the reconstruction target, kept apart from the modules.

Shapes: B batch, C channels, T frames, H/W pixels, N tokens, Nm masked tokens,
P = tubelet * patch * patch * C values per tubelet, K classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, tubelet*patch*patch, C] in token order (t, y, x).

    Inside a tubelet the layout is (frame, row, col) then channel, the VideoMAE layout
    its decoder heads were trained to predict.
    """
    B, C, T, H, W = video.shape
    t, h, w = T // tubelet, H // patch, W // patch
    x = video.reshape(B, C, t, tubelet, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, t, h, w, tubelet, patch, patch, C]
    return x.reshape(B, t * h * w, tubelet * patch * patch, C)


def normalized_pixel_target(
    video: torch.Tensor,
    masked_idx: torch.Tensor,
    tubelet: int,
    patch: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reconstruction target for the masked tubelets: [B, Nm, P].

    The normalised input is un-normalised to [0, 1] pixels; then every tubelet is
    normalised per channel by its own mean and unbiased std (+eps), as VideoMAE does.
    Computed in fp32 without gradient.
    """
    with torch.no_grad():
        video = video.float()
        m = torch.as_tensor(mean, device=video.device, dtype=video.dtype).view(1, -1, 1, 1, 1)
        s = torch.as_tensor(std, device=video.device, dtype=video.dtype).view(1, -1, 1, 1, 1)
        tokens = patchify(video * s + m, tubelet, patch)  # [B, N, p, C]
        idx = masked_idx[:, :, None, None].expand(-1, -1, tokens.shape[2], tokens.shape[3])
        tokens = tokens.gather(1, idx)  # [B, Nm, p, C]
        mu = tokens.mean(dim=2, keepdim=True)
        sd = tokens.var(dim=2, unbiased=True, keepdim=True).sqrt()
        tokens = (tokens - mu) / (sd + eps)
        return tokens.flatten(2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens (pred, target: [B, Nm, P])."""
    return F.mse_loss(pred.float(), target.float())


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels (mixup/cutmix + smoothing): [B, K], [B, K]."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy for [B, K] targets, plain cross-entropy for [B] labels."""
    if target.ndim == 2:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), target)


def total_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, recon_weight: float
) -> dict[str, torch.Tensor]:
    """Weighted sum: classification + recon_weight x masked MSE (when the model reconstructs).

    Returns {"loss", "loss_cls", "loss_recon"?} as tensors (no host sync).
    """
    parts = {"loss_cls": classification_loss(outputs["logits"], target)}
    loss = parts["loss_cls"]
    if "pred" in outputs and recon_weight > 0:
        parts["loss_recon"] = masked_mse(outputs["pred"], outputs["target"])
        loss = loss + recon_weight * parts["loss_recon"]
    parts["loss"] = loss
    return parts
