"""The random draws of the training augmentation, shared by the worker and the device path.

Every random decision of a clip's augmentation is drawn here, from the sample's seeded
generator, into a `ClipParams`; `transforms.TrainTransform` applies it with PIL in the
loader worker, `device_augment.DeviceAugment` with torch ops on the accelerator
(`DataConfig.augment_on`). Both paths therefore draw the same parameters in the same
order from the same stream: the data stream, its resume and the parameter
distributions do not depend on where the augmentation runs.

Order of the draws (each from the clip's generator ``rng``), as the recipe applies them:
RandAugment ops and their seeds (when it runs before the crop), the RandomResizedCrop
box, the flip, RandAugment (after the crop, the default), whether to erase, the erased
rectangle and its Gaussian noise.

RandAugment: timm's ops read Python's global `random` for their probability, magnitude
noise and sign. Each chosen op gets a seed from ``rng``; `RandAugmentDraw` seeds `random`
with it and runs timm's own decision code (`AugmentOp.__call__` up to the image
operation), keeping the resulting arguments (`level_args`), and restores `random`. The
same arguments then go to every frame, so a clip's frames get identical ops.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch

from marscale.core.clip import ClipConfig
from marscale.data.config import DataConfig

# timm RandomErasing defaults (min_area, max_area, min_aspect; max_aspect = 1 / min_aspect).
ERASE_AREA = (0.02, 1 / 3)
ERASE_MIN_ASPECT = 0.3
_MAX_TRIES = 10
_LEVEL_DENOM = 10.0  # timm's magnitude scale (M0..M10)

OP_KINDS = (
    "auto_contrast", "equalize", "invert", "posterize", "solarize", "solarize_add",
    "color", "contrast", "brightness", "sharpness",
    "rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs", "translate_y_abs",
)
"""The image operations of timm's RandAugment ops (their `aug_fn` names) that both paths
implement; "Posterize" and "PosterizeIncreasing" differ only in how the magnitude maps
to the argument, so they share one kind."""


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
    from PIL import Image

    return dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(int(round(255 * m)) for m in mean),
        interpolation=Image.BICUBIC,
    )


def posterize_any_bits(img, bits_to_keep: int, **_):
    """timm's posterize, also for 0 bits (a black image, as TF's RandAugment gives).

    timm maps the top magnitude of PosterizeIncreasing to 0 bits, which Pillow >= 13
    rejects; with mstd > 0 a clip hits it now and then, and must not crash a worker.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


OpDraw = tuple[int, tuple]
"""One RandAugment op that applies to a clip: (index into `RandAugmentDraw.ops`, its
arguments for the image operation, e.g. (degrees,) for a rotation)."""


class RandAugmentDraw:
    """timm RandAugment's ops, and the draw of which of them apply to a clip and how."""

    def __init__(self, config_str: str, img_size: int, mean: tuple):
        from timm.data import auto_augment

        self.ra = auto_augment.rand_augment_transform(config_str, rand_augment_hparams(img_size, mean))
        for op in self.ra.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits
        self.ops = self.ra.ops
        self.num_layers = self.ra.num_layers
        names = {fn.__name__: fn for fn in auto_augment.NAME_TO_OP.values()}
        names["posterize"] = posterize_any_bits
        self.kinds: list[int | None] = []
        """Each op's index in `OP_KINDS`, None for an image operation the device path lacks."""
        for op in self.ops:
            kind = "posterize" if op.aug_fn is posterize_any_bits else op.aug_fn.__name__
            known = kind in OP_KINDS and names.get(kind) is op.aug_fn
            self.kinds.append(OP_KINDS.index(kind) if known else None)

    def __call__(self, rng: np.random.Generator) -> tuple[OpDraw, ...]:
        """The ops that apply to one clip, in order, with their arguments."""
        ra = self.ra
        chosen = rng.choice(len(self.ops), ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        op_seeds = rng.integers(0, 2**63, size=len(chosen))
        draws = []
        saved = random.getstate()  # timm's decisions read the global `random`: leave it as found
        try:
            for op_index, op_seed in zip(chosen.tolist(), op_seeds.tolist()):
                random.seed(op_seed)
                args = _op_arguments(self.ops[op_index])
                if args is not None:
                    draws.append((op_index, args))
        finally:
            random.setstate(saved)
        return tuple(draws)


def _op_arguments(op) -> tuple | None:
    """timm's `AugmentOp.__call__` without the image: None when the op does not apply
    (its probability), else the arguments it would pass to its image operation."""
    if op.prob < 1.0 and random.random() > op.prob:
        return None
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        else:
            magnitude = random.gauss(magnitude, op.magnitude_std)
    magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
    return tuple(op.level_fn(magnitude, op.hparams)) if op.level_fn is not None else ()


@dataclasses.dataclass(frozen=True)
class ClipParams:
    """Every random decision of one clip's training augmentation."""

    size: tuple[int, int]
    """(height, width) of the frames the parameters were drawn for."""
    ops_before_crop: tuple[OpDraw, ...]
    """RandAugment ops applied to the full frames (`rand_augment_before_crop`)."""
    crop: tuple[int, int, int, int]
    """RandomResizedCrop box (top, left, h, w) in the frames, resized to img_size."""
    flipped: bool
    ops_after_crop: tuple[OpDraw, ...]
    """RandAugment ops applied to the crop (the default placement)."""
    erase: tuple[int, int, int, int] | None
    """Erased rectangle (top, left, h, w) of the img_size crop, or None."""
    noise: np.ndarray | None
    """uint8 [h, w, 3]: the erased rectangle's fill, the same on every frame."""

    def to_tensors(self, num_layers: int, img_size: int) -> dict[str, torch.Tensor]:
        """Fixed-size tensors that `stages.collate` stacks over a batch (the device path's
        input): "size" int64 [2], "crop" int64 [4], "flip" int64 [], "ops" int64 [L] (op
        index, -1 none; L = num_layers), "args" float64 [L] (the op's argument, 0 for ops
        without one), "erase" int64 [4] (h = w = 0: none), "noise" uint8 [`noise_capacity(S)`, 3]
        (the rectangle's h * w fill values, row-major, then zeros)."""
        ops = self.ops_before_crop or self.ops_after_crop
        op_index = torch.full((num_layers,), -1, dtype=torch.int64)
        args = torch.zeros(num_layers, dtype=torch.float64)
        for layer, (index, op_args) in enumerate(ops):
            op_index[layer] = index
            args[layer] = float(op_args[0]) if op_args else 0.0
        noise = torch.zeros(noise_capacity(img_size), 3, dtype=torch.uint8)
        if self.noise is not None:
            noise[: self.noise.shape[0] * self.noise.shape[1]] = torch.from_numpy(self.noise.reshape(-1, 3))
        return {
            "size": torch.tensor(self.size, dtype=torch.int64),
            "crop": torch.tensor(self.crop, dtype=torch.int64),
            "flip": torch.tensor(int(self.flipped), dtype=torch.int64),
            "ops": op_index,
            "args": args,
            "erase": torch.tensor(self.erase or (0, 0, 0, 0), dtype=torch.int64),
            "noise": noise,
        }


def noise_capacity(img_size: int) -> int:
    """Pixels the largest erased rectangle of an img_size crop can hold: a third of the
    area (`ERASE_AREA`) plus the rounding of its sides to whole pixels."""
    return img_size * img_size // 3 + 2 * img_size + 1


class AugmentDraw:
    """(frame height, frame width, the clip's generator) -> `ClipParams`, as the recipe draws."""

    def __init__(self, cfg: DataConfig, clip: ClipConfig):
        self.size = clip.img_size
        self.scale = cfg.rrc_scale
        self.ratio = cfg.rrc_ratio
        self.flip = cfg.flip
        self.erase_prob = cfg.random_erasing
        self.fill_mean = np.array(clip.mean) * 255.0
        self.fill_std = np.array(clip.std) * 255.0
        self.before_crop = cfg.rand_augment_before_crop
        self.rand_augment = RandAugmentDraw(cfg.rand_augment, clip.img_size, clip.mean) if cfg.rand_augment else None
        self.num_layers = self.rand_augment.num_layers if self.rand_augment is not None else 0

    def _ops(self, rng: np.random.Generator, here: bool) -> tuple[OpDraw, ...]:
        return self.rand_augment(rng) if here and self.rand_augment is not None else ()

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> ClipParams:
        ops_before = self._ops(rng, self.before_crop)
        crop = rrc_params(height, width, self.scale, self.ratio, rng)
        flipped = self.flip and rng.random() < 0.5
        ops_after = self._ops(rng, not self.before_crop)
        erase = noise = None
        if rng.random() < self.erase_prob:
            erase = erasing_params(self.size, self.size, rng)
            if erase is not None:
                _, _, h, w = erase
                noise = np.clip(np.rint(rng.normal(self.fill_mean, self.fill_std, size=(h, w, 3))), 0, 255)
                noise = noise.astype(np.uint8)
        return ClipParams((height, width), ops_before, crop, bool(flipped), ops_after, erase, noise)
