"""The clip section: the one description of a training clip that every component reads.

The model (token grid, positions), the loader (which frames to decode, the crop size),
the on-device normalisation, the reconstruction target and the cost counter all read
this one `clip:` section, so a clip shape or pixel statistic is written once.

The patch size is not here: it belongs to the encoder size (ViT-g uses 14), so the token
grid comes from `token_grid(clip, patch_size)`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from marscale.core.choices import check_choices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Sampling = Literal["dense", "segment"]
SegmentRule = Literal["marscale", "reference"]


@dataclasses.dataclass
class ClipConfig:
    """Frames, size, tubelets, pixel statistics and frame sampling (the `clip:` section)."""

    num_frames: int = 16
    """Frames per clip (T)."""
    img_size: int = 224
    """Side of the square frames the model sees (the training crop and the evaluation crop);
    a multiple of the encoder's patch size."""
    tubelet_size: int = 2
    """Frames per tubelet (the temporal patch size); divides num_frames."""
    sampling: Sampling = "dense"
    """Frame sampling. "dense" (Kinetics): `num_frames` frames `sampling_interval` apart from
    a random window in training, evenly spaced windows in evaluation. "segment"
    (Something-Something v2): the video is cut into `num_frames` equal segments and one
    frame is taken from each, at a random offset in training and at the centre in evaluation
    (`segment_rule` says exactly where)."""
    segment_rule: SegmentRule = "marscale"
    """"segment" only: where the segments' bounds and the evaluation clips fall.
    "marscale": bounds at round((L - 1) / T * i) (L video frames, bounds inclusive);
    evaluation clip k of n at (k + 0.5) / n of the way through each segment, so views stay
    inside the segments. "reference" (the MAR reference, the SSv2 presets): bounds at
    L * i / T (linspace(0, L, T + 1)); one evaluation clip at each segment's centre, n > 1
    at k / (n - 1) of the way (the first on the segment's start, the last on its end);
    positions clamped to L - 1 and rounded half to even. Training draws uniformly inside
    each segment under both. `marscale.data.sampling` has the formulas."""
    sampling_interval: int = 4
    """Distance in source frames between two sampled frames ("dense" only); with
    `sampling_fps`, the distance at that frame rate."""
    sampling_fps: float | None = None
    """"dense" only. None: frames exactly `sampling_interval` apart whatever the video's
    frame rate. A rate (the MAR reference: 30.0): the window covers `num_frames` x
    `sampling_interval` frames *at this rate*, i.e. that many x video fps / sampling_fps
    source frames, and the `num_frames` indices are spread evenly over it and truncated
    (16 x 4 at 30.0: first and last index 63 frames apart in a 30 fps video, 52 or 53 in
    a 25 fps one), so a clip covers the same time (about 2.1 s) at any frame rate, in
    training and evaluation. The video's fps is the decoder's (`marscale.data.sampling`
    has the formula)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (RGB, 0-1 scale) the clip is normalised with on the device; the
    reconstruction target un-normalises with the same values."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std (RGB, 0-1 scale), as `mean`."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        for name in ("num_frames", "img_size", "tubelet_size", "sampling_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"clip.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"clip.num_frames {self.num_frames} is not a multiple of clip.tubelet_size {self.tubelet_size}"
            )
        if self.sampling_fps is not None:
            self.sampling_fps = float(self.sampling_fps)
            if not self.sampling_fps > 0:
                raise ValueError(
                    f"clip.sampling_fps must be > 0 (e.g. 30.0), or null for a fixed interval; got {self.sampling_fps}"
                )
            if self.sampling != "dense":
                raise ValueError(
                    f"clip.sampling_fps scales dense windows only; set it to null for sampling={self.sampling!r}"
                )
        if self.segment_rule != "marscale" and self.sampling != "segment":
            raise ValueError(
                f"clip.segment_rule places segments only; remove it (or set sampling: segment) "
                f"for sampling={self.sampling!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"clip.mean and clip.std need 3 values (RGB, 0-1 scale) and std > 0; got {self.mean}, {self.std}"
            )


def token_grid(clip: ClipConfig, patch_size: int) -> tuple[int, int, int]:
    """(T', H', W'): tokens along time, height and width of `clip` cut into tubelets of
    tubelet_size x patch_size x patch_size."""
    if clip.img_size % patch_size:
        raise ValueError(
            f"clip.img_size {clip.img_size} is not a multiple of the encoder's patch size {patch_size}"
        )
    side = clip.img_size // patch_size
    return (clip.num_frames // clip.tubelet_size, side, side)


def num_tokens(clip: ClipConfig, patch_size: int) -> int:
    """Tokens per clip: T' x H' x W'."""
    t, h, w = token_grid(clip, patch_size)
    return t * h * w


def tubelet_values(clip: ClipConfig, patch_size: int, channels: int = 3) -> int:
    """P, the pixel values of one tubelet (tubelet_size x patch x patch x channels): what the
    reconstruction decoder predicts per masked token."""
    return channels * clip.tubelet_size * patch_size**2
