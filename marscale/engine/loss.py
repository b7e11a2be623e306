"""Loss functions and the reconstruction target, kept apart from the modules.

Shapes: B batch, C channels, T frames, H/W pixels, N tokens, Mtot masked tokens of the
batch (packed layout, `marscale.tokens.packing`), P = tubelet * patch * patch * C values
per tubelet, K classes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from marscale.core.clip import ClipConfig
from marscale.tokens.packing import PackedTokens


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
    tokens: PackedTokens,
    tubelet: int,
    patch: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reconstruction target for the masked tubelets of `tokens`: [Mtot, P], in the order
    the decoder predicts them (`PackedTokens.masked_slots`).

    The normalised input is un-normalised to [0, 1] pixels; then every tubelet is
    normalised per channel by its own mean and unbiased std (+eps), as VideoMAE does.
    Computed in fp32 without gradient.
    """
    with torch.no_grad():
        video = video.float()
        m = torch.as_tensor(mean, device=video.device, dtype=video.dtype).view(1, -1, 1, 1, 1)
        s = torch.as_tensor(std, device=video.device, dtype=video.dtype).view(1, -1, 1, 1, 1)
        pixels = patchify(video * s + m, tubelet, patch)  # [B, N, p, C]
        pixels = pixels.flatten(0, 1)[tokens.flat_masked]  # [Mtot, p, C]
        mu = pixels.mean(dim=-2, keepdim=True)
        sd = pixels.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        pixels = (pixels - mu) / (sd + eps)
        return pixels.flatten(-2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens (pred, target: [Mtot, P]): every masked
    token weighs the same, whichever clip it is in."""
    return F.mse_loss(pred.float(), target.float())


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels (mixup/cutmix + smoothing): [B, K], [B, K]."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy for [B, K] targets, plain cross-entropy for [B] labels."""
    if target.ndim == 2:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), target)


@dataclasses.dataclass(frozen=True)
class MARLoss:
    """loss = classification + recon_weight x masked MSE, as MAE's `forward_loss`: the
    reconstruction target is built here, from the clip the model saw, not by the model.

    Built once per run (`build_loss`) from the clip section, the encoder's patch size and
    the weight; called per micro-batch. Returns {"loss", "loss_cls", "loss_recon"?} as
    tensors (no host sync).

    Weighting, when clips keep different numbers of tokens: classification is averaged per
    clip and reconstruction per masked token, both over the whole optimizer step (every
    micro-batch of every rank), so a step's gradient is that of one big batch however
    the clips fell on ranks and micro-batches. Per masked token, not per clip: a clip
    masked at 75% has three times the reconstruction targets of one at 25%, and each
    target is one tubelet's worth of evidence, as in MAE/VideoMAE's mean over all masked
    tokens. The caller passes `cls_scale` and `recon_scale` that turn this micro-batch's
    means into its share of the step's (`marscale.tokens.batches.loss_scales`); the returned
    "loss_cls" and "loss_recon" stay this micro-batch's plain means (for logging).
    """

    tubelet_size: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    recon_weight: float

    def __call__(
        self,
        outputs: dict[str, torch.Tensor],
        video: torch.Tensor,
        tokens: PackedTokens | None,
        target: torch.Tensor,
        *,
        cls_scale: float = 1.0,
        recon_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """outputs: the model's {"logits" [B, K], "pred"? [Mtot, P]}; video: the normalised
        clip the model saw [B, C, T, H, W]; tokens: the batch's token layout (None: every
        token visible); target: soft [B, K] or hard [B] labels."""
        parts = {"loss_cls": classification_loss(outputs["logits"], target)}
        loss = parts["loss_cls"] if cls_scale == 1.0 else cls_scale * parts["loss_cls"]
        if "pred" in outputs and self.recon_weight > 0:
            if tokens is None:
                raise ValueError("the model reconstructed masked tokens but no token layout was given")
            recon_target = normalized_pixel_target(
                video, tokens, self.tubelet_size, self.patch_size, self.mean, self.std
            )
            parts["loss_recon"] = masked_mse(outputs["pred"], recon_target)
            loss = loss + self.recon_weight * recon_scale * parts["loss_recon"]
        parts["loss"] = loss
        return parts


def build_loss(clip: ClipConfig, patch_size: int, recon_weight: float) -> MARLoss:
    """The training loss for clips shaped as `clip` cut into `patch_size` patches."""
    return MARLoss(clip.tubelet_size, patch_size, tuple(clip.mean), tuple(clip.std), recon_weight)
