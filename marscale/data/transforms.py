"""Clip augmentation (training) and multi-view cropping (evaluation), uint8 end to end.

Frames stay uint8 on the host: decoded uint8 [T, H, W, 3] in, uint8 [C, T, H, W] out.
Conversion to float and normalisation happen on the accelerator (`mixup.normalize`), so
a batch crosses PCIe at a quarter of the float32 size.

Training (`TrainTransform`), one random draw per clip applied to every frame, so motion
is not corrupted by per-frame jitter:

1. RandomResizedCrop to ``img_size`` (area `rrc_scale`, aspect `rrc_ratio`, bilinear).
2. Horizontal flip with probability 0.5 (when ``flip``). The transform says whether it
   flipped, so the loader can swap the labels of `flip_label_pairs` for that clip.
3. timm RandAugment with the same ops and magnitudes on every frame: the ops are drawn
   once, and Python's `random` (which timm's ops read for probability, magnitude noise
   and sign) is reseeded to the same value before each frame.
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

import math
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from marscale.clip import ClipConfig
from marscale.data.config import DataConfig

# timm RandomErasing defaults (min_area, max_area, min_aspect; max_aspect = 1 / min_aspect).
ERASE_AREA = (0.02, 1 / 3)
ERASE_MIN_ASPECT = 0.3
_MAX_TRIES = 10


def to_channels_first(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, C] numpy -> uint8 [C, T, H, W] tensor (contiguous)."""
    # numpy's transposing copy of uint8 is about 8x faster than torch's permute().contiguous().
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))


def rrc_params(
    height: int, width: int, scale: tuple, ratio: tuple, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm with `rng`.

    Ten tries at a random area and log-uniform aspect; if none fits, the largest centred
    crop whose aspect is clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_MAX_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def erasing_params(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """Random erasing rectangle (top, left, h, w) with timm's ranges, or None if none fits."""
    area = height * width
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(_MAX_TRIES):
        target_area = rng.uniform(*ERASE_AREA) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if 0 < w < width and 0 < h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def rand_augment_hparams(img_size: int, mean: tuple) -> dict:
    """timm RandAugment hyper-parameters as timm's `create_transform` sets them for `img_size`."""
    return dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(int(round(255 * m)) for m in mean),
        interpolation=Image.BICUBIC,
    )


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits (a black image, as TF's RandAugment gives).

    timm maps the top magnitude of PosterizeIncreasing to 0 bits, which Pillow >= 13
    rejects; with mstd > 0 a clip hits it now and then, and must not crash a worker.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class ClipRandAugment:
    """timm RandAugment applied with identical ops and magnitudes to every frame of a clip."""

    def __init__(self, config_str: str, img_size: int, mean: tuple):
        from timm.data import auto_augment

        self._ra = auto_augment.rand_augment_transform(config_str, rand_augment_hparams(img_size, mean))
        for op in self._ra.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits

    def __call__(self, images: list[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
        ra = self._ra
        chosen = rng.choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        op_seeds = rng.integers(0, 2**63, size=len(chosen))
        # timm's ops draw from the global `random` module: reseed it identically for each
        # frame so every frame gets the same decisions, and restore it afterwards.
        saved = random.getstate()
        try:
            for op_index, op_seed in zip(chosen.tolist(), op_seeds.tolist()):
                op = ra.ops[op_index]
                for i, image in enumerate(images):
                    random.seed(op_seed)
                    images[i] = op(image)
        finally:
            random.setstate(saved)
        return images


def _no_augment(images: list[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
    return images


class TrainTransform:
    """uint8 [T, H, W, 3] frames -> (augmented uint8 [C, T, img_size, img_size] clip, flipped)."""

    def __init__(self, cfg: DataConfig, clip: ClipConfig):
        self.size = clip.img_size
        self.scale = cfg.rrc_scale
        self.ratio = cfg.rrc_ratio
        self.flip = cfg.flip
        self.erase_prob = cfg.random_erasing
        self.fill_mean = np.array(clip.mean) * 255.0
        self.fill_std = np.array(clip.std) * 255.0
        rand_augment = ClipRandAugment(cfg.rand_augment, clip.img_size, clip.mean) if cfg.rand_augment else _no_augment
        # One of the two places runs RandAugment; the other is a no-op.
        self.augment_frames = rand_augment if cfg.rand_augment_before_crop else _no_augment
        self.augment_crops = _no_augment if cfg.rand_augment_before_crop else rand_augment

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """The augmented clip uint8 [C, T, S, S], and whether it was flipped horizontally."""
        _, height, width, _ = frames.shape
        images = self.augment_frames([Image.fromarray(frame) for frame in frames], rng)  # full frames
        top, left, h, w = rrc_params(height, width, self.scale, self.ratio, rng)
        flipped = self.flip and rng.random() < 0.5
        box = (left, top, left + w, top + h)
        crops = []
        for image in images:
            crop = image.resize((self.size, self.size), Image.BILINEAR, box=box)
            crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else crop)
        crops = self.augment_crops(crops, rng)
        clip = np.stack([np.asarray(crop.convert("RGB")) for crop in crops])  # [T, S, S, 3]
        if rng.random() < self.erase_prob:
            clip = self.erase(clip, rng)
        return to_channels_first(clip), flipped

    def erase(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Fill one rectangle, the same on all frames, with the same Gaussian noise."""
        rect = erasing_params(clip.shape[1], clip.shape[2], rng)
        if rect is None:
            return clip
        top, left, h, w = rect
        noise = rng.normal(self.fill_mean, self.fill_std, size=(h, w, 3))
        clip = clip.copy()
        clip[:, top : top + h, left : left + w] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
        return clip


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
