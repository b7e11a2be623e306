"""Clip augmentation (training) and multi-view cropping (evaluation), uint8 end to end.

Frames stay uint8 on the host: decoded uint8 [T, H, W, 3] in, uint8 [C, T, H, W] out.
Conversion to float and normalisation happen on the accelerator (`mixup.normalize`), so
a batch crosses PCIe at a quarter of the float32 size.

Training (`TrainTransform`), one random draw per clip applied to every frame, so motion
is not corrupted by per-frame jitter. The draw (`augment_params.AugmentDraw`, a
`ClipParams`) is shared with the device path (`device_augment.DeviceAugment`,
``data.augment_on: device``), which applies the same parameters with torch ops; this
module applies them with PIL in the loader worker:

1. RandomResizedCrop to ``img_size`` (area `rrc_scale`, aspect `rrc_ratio`, bilinear).
2. Horizontal flip with probability 0.5 (when ``flip``). The transform says whether it
   flipped, so the loader can swap the labels of `flip_label_pairs` for that clip.
3. timm RandAugment with the same ops and magnitudes on every frame: the ops, whether
   each applies, its magnitude and sign are drawn once (timm's own decision code, with
   Python's `random` seeded from the clip's generator), and timm's image operation runs
   with those arguments on every frame.
4. Random erasing: with probability ``random_erasing`` one rectangle (timm's area range
   0.02-1/3 and log-aspect range 0.3-3.3), the same on every frame, filled with the
   same per-pixel Gaussian noise of mean ``255 * mean`` and std ``255 * std`` (clipped to
   uint8). After normalisation that is timm's "pixel" mode noise, N(0, 1).

RandAugment placement (``rand_augment_before_crop``). By default it runs on the crop
(step 3), as the MAR reference does for Something-Something v2: the ops are the same
kind and running them on the small crop is cheaper. With ``rand_augment_before_crop``
it runs first, on the full decoded frames, as the MAR reference (`kinetics400.py`,
``AUTOAUGMENT.BEFORE_CROP``) and VideoMAE do for Kinetics: geometric ops then move
content across the crop border and the cost grows with the frame's area. The
hyper-parameters are the same in both places (the reference sizes them by the crop),
and timm's "rand" ops translate by a fraction of the image they see. The reference
flips first (Kinetics) or last, after erasing (its Something-Something v2 flip); the
flip right after the crop draws the same distribution, since the crop box, every
RandAugment op and the erased rectangle are as likely mirrored.

Evaluation (`EvalTransform`): frames are resized so the short side is ``short_side``,
then ``test_num_crops`` squares of ``img_size`` are cut along the long side (3: start /
centre / end, 1: centre; centred across the short side), for each of the
``test_num_clips`` temporal windows. View number = clip * test_num_crops + crop.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from marscale.core.clip import ClipConfig
from marscale.data.augment_params import AugmentDraw, ClipParams, OpDraw, RandAugmentDraw
from marscale.data.config import DataConfig


def to_channels_first(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, C] numpy -> uint8 [C, T, H, W] tensor (contiguous)."""
    # numpy's transposing copy of uint8 is about 8x faster than torch's permute().contiguous().
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))


class ClipRandAugment:
    """timm RandAugment applied with identical ops and magnitudes to every frame of a clip."""

    def __init__(self, config_str: str, img_size: int, mean: tuple):
        self.draw = RandAugmentDraw(config_str, img_size, mean)
        self._ra = self.draw.ra

    def apply(self, images: list[Image.Image], ops: tuple[OpDraw, ...]) -> list[Image.Image]:
        """Run the drawn `ops` (timm's image operations with the drawn arguments) on every frame."""
        for op_index, args in ops:
            op = self.draw.ops[op_index]
            images = [op.aug_fn(image, *args, **op.kwargs) for image in images]
        return images

    def __call__(self, images: list[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
        return self.apply(images, self.draw(rng))


class TrainTransform:
    """uint8 [T, H, W, 3] frames -> (augmented uint8 [C, T, img_size, img_size] clip, flipped).

    The parameters come from `augment_params.AugmentDraw` (the device path draws the same);
    `apply` runs them with PIL."""

    def __init__(self, cfg: DataConfig, clip: ClipConfig):
        self.size = clip.img_size
        self.draw = AugmentDraw(cfg, clip)
        self.rand_augment = (
            ClipRandAugment(cfg.rand_augment, clip.img_size, clip.mean) if cfg.rand_augment else None
        )

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """The augmented clip uint8 [C, T, S, S], and whether it was flipped horizontally."""
        params = self.draw(frames.shape[1], frames.shape[2], rng)
        return self.apply(frames, params), params.flipped

    def apply(self, frames: np.ndarray, params: ClipParams) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> the clip `params` describe, uint8 [C, T, S, S]."""
        images = [Image.fromarray(frame) for frame in frames]
        if self.rand_augment is not None and self.draw.before_crop:
            images = self.rand_augment.apply(images, params.ops_before_crop)  # full frames
        top, left, h, w = params.crop
        box = (left, top, left + w, top + h)
        crops = []
        for image in images:
            crop = image.resize((self.size, self.size), Image.BILINEAR, box=box)
            crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flipped else crop)
        if self.rand_augment is not None and not self.draw.before_crop:
            crops = self.rand_augment.apply(crops, params.ops_after_crop)
        clip = np.stack([np.asarray(crop.convert("RGB")) for crop in crops])  # [T, S, S, 3]
        if params.erase is not None:
            top, left, h, w = params.erase
            clip = clip.copy()  # np.asarray of a PIL image is read-only
            clip[:, top : top + h, left : left + w] = params.noise
        return to_channels_first(clip)


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> [F, H', W', 3] with min(H', W') = short_side (bilinear)."""
    _, height, width, _ = frames.shape
    if min(height, width) == short_side:
        return frames
    if height <= width:
        new_h, new_w = short_side, max(short_side, int(round(width * short_side / height)))
    else:
        new_h, new_w = max(short_side, int(round(height * short_side / width))), short_side
    return np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BILINEAR)) for f in frames])


def crop_offsets(length: int, size: int, num_crops: int) -> list[int]:
    """Start of each of `num_crops` windows of `size` along `length` (1: centred)."""
    if size > length:
        raise ValueError(f"crop of {size} does not fit in {length} pixels")
    if num_crops == 1:
        return [(length - size) // 2]
    return [(length - size) * k // (num_crops - 1) for k in range(num_crops)]


class EvalTransform:
    """Decoded frames -> every (clip, crop) view of a video, deterministically."""

    def __init__(self, cfg: DataConfig, clip: ClipConfig):
        self.size = clip.img_size
        self.short_side = cfg.short_side
        self.num_crops = cfg.test_num_crops

    def __call__(self, frames: np.ndarray, clip_frames: np.ndarray) -> list[torch.Tensor]:
        """`frames`: uint8 [F, H, W, 3] distinct decoded frames; `clip_frames`: [num_clips, T]
        positions into `frames`. Returns num_clips * num_crops uint8 [C, T, S, S] views,
        view = clip * num_crops + crop."""
        frames = resize_short_side(frames, self.short_side)
        _, height, width, _ = frames.shape
        if width >= height:  # crops move along the width
            boxes = [((height - self.size) // 2, x) for x in crop_offsets(width, self.size, self.num_crops)]
        else:
            boxes = [(y, (width - self.size) // 2) for y in crop_offsets(height, self.size, self.num_crops)]
        views = []
        for positions in clip_frames:
            clip = frames[positions]
            for top, left in boxes:
                views.append(to_channels_first(clip[:, top : top + self.size, left : left + self.size]))
        return views
