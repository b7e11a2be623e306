"""On-device batch steps: uint8 -> normalised float, and mixup/cutmix with soft targets.

Both run on the accelerator after the uint8 batch has been transferred (a quarter of
the float32 bytes). Shapes: video [B, C, T, H, W], labels int64 [B], targets float [B, K].

`VideoMixup` wraps timm's `Mixup` (batch mode: the batch is mixed with its reverse,
one lambda per batch, mixup or cutmix chosen with probability 0.5 when both are on).
timm's cutmix indexes ``x[:, :, y0:y1, x0:x1]``, which on [B, C, T, H, W] would cut the
T and H axes; the batch is therefore viewed as [B, C*T, H, W] while timm mixes it in
place, so the box is spatial and the same on every frame. timm draws lambda and the box
from numpy's global generator: seed numpy per rank for reproducible mixing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from marscale.data.config import DataConfig


def normalize(
    video: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [..., C, T, H, W] in 0-255 -> `dtype` (x / 255 - mean) / std, on video's device.

    `mean`/`std` are per channel on the 0-1 scale (ImageNet's, as in `DataConfig`).
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"normalize expects the uint8 batch from the loader, got {video.dtype}")
    channels = video.shape[-4]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{channels} channels but {len(mean)} means and {len(std)} stds")
    # Fold the /255 into the constants: one subtract and one divide per element.
    shift = torch.tensor(mean, dtype=torch.float32, device=video.device).mul_(255.0).view(channels, 1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=video.device).mul_(255.0).view(channels, 1, 1, 1)
    return video.to(torch.float32).sub_(shift).div_(scale).to(dtype)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """[B] int64 -> [B, K] float: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class VideoMixup:
    """Mixup / cutmix over a video batch, returning soft targets (label smoothing included).

    With both alphas at 0 no mixing happens and the targets are the smoothed one-hots.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float):
        from timm.data.mixup import Mixup

        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.enabled = mixup_alpha > 0 or cutmix_alpha > 0
        self._mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            mode="batch",
        )

    def __call__(self, video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video float [B, C, T, H, W] (mixed in place), labels int64 [B] -> (video, targets [B, K])."""
        if not self.enabled:
            return video, smoothed_one_hot(labels, self.num_classes, self.label_smoothing)
        if video.shape[0] % 2:
            raise ValueError(
                f"mixup/cutmix pair each clip with the reversed batch: batch size {video.shape[0]} must be even"
            )
        b, c, t, h, w = video.shape
        frames_as_channels = video.contiguous().view(b, c * t, h, w)  # a view: timm mixes it in place
        mixed, targets = self._mixup(frames_as_channels, labels)
        return mixed.view(b, c, t, h, w), targets


def build_mixup(cfg: DataConfig, num_classes: int) -> VideoMixup:
    return VideoMixup(num_classes, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
