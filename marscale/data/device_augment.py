"""The training augmentation on the accelerator: parameters drawn in the worker, applied batched.

With ``data.augment_on: device`` the loader worker only decodes and cuts the temporal
window(s); each clip leaves it as the decoded frames, uint8 [T, H, W, 3], plus its
`augment_params.ClipParams` (drawn from the sample's generator with the code the worker
path uses, so the stream, resume and distributions are the same). `stages.collate`
stacks a batch: "video" uint8 [B, T, H, W, 3], zero-padded to the batch's largest frame
(each clip's own size is in its parameters), and "augment", the stacked tensors of
`ClipParams.to_tensors`. `DeviceAugment` turns that into uint8 [B, C, T, S, S] on the
batch's device, what `transforms.TrainTransform` makes from the same parameters; the
trainer then normalises and mixes as before.

How each step reproduces Pillow's (the worker path's) pixels; the differences measured
against it are in tests/test_data_device_augment.py:

- crop + resize: Pillow's bilinear weights (widened when shrinking, reaching past the
  box into the frame, in its fixed point), a horizontal then a vertical pass as matrix
  products, each rounded as Pillow rounds: a few values off by one or two levels (float32
  sums where Pillow sums in fixed point).
- flip: exact.
- invert, posterize, solarize, solarize-add: a 256-entry table per clip, made by timm's
  own operation on a ramp image: exact.
- autocontrast, equalize: Pillow's tables, from each frame's per-channel histogram: exact
  but for autocontrast's rare value on a rounding boundary (one level).
- color, contrast, brightness, sharpness: Pillow's blend (float32, truncated) with its
  degenerate images (grey by Pillow's integer ITU-R 601 weights, the frame's mean grey,
  black, the 3x3 smoothing filter with the border kept).
- rotate, shear, translate: Pillow's affine transform: each output pixel centre is mapped
  through the op's matrix, sampled bicubic with Pillow's transform kernel (a = -1) and
  clamped neighbours, truncated; points outside the frame get the fill colour.
- random erasing: the worker's noise, pasted into the rectangle: exact.

Clips are cropped one by one (their boxes differ in size); the RandAugment ops after the
crop run batched, each op once per layer over the clips that drew it. With
`rand_augment_before_crop` the ops run per clip on its full frame, before the crop.
Nothing here draws a random number or reads the device back to the host: every
parameter is already on the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from marscale.core.clip import ClipConfig
from marscale.data.augment_params import OP_KINDS, RandAugmentDraw, rand_augment_hparams
from marscale.data.config import DataConfig

_POINT = {"invert", "posterize", "solarize", "solarize_add"}
_HISTOGRAM = {"auto_contrast", "equalize"}
_BLEND = {"color", "contrast", "brightness", "sharpness"}
_AFFINE = {"rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs", "translate_y_abs"}
_INTEGER_ARG = {"posterize", "solarize", "solarize_add"}


class DeviceAugment:
    """(uint8 video [B, T, H, W, 3] on the device, stacked `ClipParams` tensors on the host)
    -> augmented uint8 [B, C, T, S, S] on the device."""

    def __init__(self, cfg: DataConfig, clip: ClipConfig):
        self.size = clip.img_size
        self.before_crop = cfg.rand_augment_before_crop
        self.rand_augment = RandAugmentDraw(cfg.rand_augment, clip.img_size, clip.mean) if cfg.rand_augment else None
        if self.rand_augment is not None and None in self.rand_augment.kinds:
            missing = [op.name for op, k in zip(self.rand_augment.ops, self.rand_augment.kinds) if k is None]
            raise ValueError(
                f"data.rand_augment={cfg.rand_augment!r} uses {', '.join(missing)}, which the device path does not "
                f"implement (it has: {', '.join(OP_KINDS)}); set data.augment_on: worker"
            )
        self.fill = rand_augment_hparams(clip.img_size, clip.mean)["img_mean"]
        self._luts: dict[tuple[int, float], np.ndarray] = {}

    def __call__(self, video: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, T, H, W, 3] frames, got {video.dtype} {tuple(video.shape)}")
        size = self.size
        batch, frames = video.shape[:2]
        x = video.permute(0, 1, 4, 2, 3)  # [B, T, C, H, W], a view
        sizes, crops, flips = params["size"].tolist(), params["crop"].tolist(), params["flip"].tolist()
        ops, args = params["ops"].tolist(), params["args"].tolist()
        out = torch.empty(batch, frames, 3, size, size, dtype=torch.uint8, device=video.device)
        for b in range(batch):
            h, w = sizes[b]
            clip = x[b : b + 1, :, :, :h, :w]  # [1, T, C, h, w]
            if self.before_crop:
                clip = self.apply_layers(clip, ops[b : b + 1], args[b : b + 1])
            resized = resize_box(clip[0], crops[b], size)
            out[b] = resized.flip(-1) if flips[b] else resized
        if not self.before_crop:
            out = self.apply_layers(out, ops, args)
        erase = params["erase"].tolist()
        noise = None
        for b, (top, left, h, w) in enumerate(erase):
            if h and w:
                if noise is None:
                    noise = params["noise"].to(video.device, non_blocking=True)  # [B, capacity, 3]
                out[b, :, :, top : top + h, left : left + w] = noise[b, : h * w].view(h, w, 3).permute(2, 0, 1)
        return out.permute(0, 2, 1, 3, 4).contiguous()  # [B, C, T, S, S]

    # --- RandAugment ------------------------------------------------------------------

    def apply_layers(self, x: torch.Tensor, ops: list[list[int]], args: list[list[float]]) -> torch.Tensor:
        """x uint8 [n, T, C, H, W]; ops/args: per clip, per layer (op index, -1: none).
        Layer by layer, each op once over the clips that drew it."""
        if self.rand_augment is None:
            return x
        for layer in range(len(ops[0]) if ops else 0):
            groups: dict[int, list[int]] = {}
            for i, clip_ops in enumerate(ops):
                if clip_ops[layer] >= 0:
                    groups.setdefault(clip_ops[layer], []).append(i)
            for op_index, members in groups.items():
                values = [args[i][layer] for i in members]
                if len(members) == x.shape[0]:
                    x = self.apply_op(x, op_index, values)
                    continue
                index = torch.tensor(members, device=x.device)
                x = x.index_copy(0, index, self.apply_op(x.index_select(0, index), op_index, values))
        return x

    def apply_op(self, x: torch.Tensor, op_index: int, values: list[float]) -> torch.Tensor:
        """RandAugment op `op_index` with one argument per clip on x uint8 [n, T, C, H, W]."""
        kind = OP_KINDS[self.rand_augment.kinds[op_index]]
        if kind in _POINT:
            table = np.stack([self._point_lut(op_index, v) for v in values])  # [n, 256]
            return apply_lut(x, torch.from_numpy(table).to(x.device).view(-1, 1, 1, 256))
        if kind == "auto_contrast":
            return apply_lut(x, autocontrast_lut(histograms(x)))
        if kind == "equalize":
            return apply_lut(x, equalize_lut(histograms(x)))
        if kind in _BLEND:
            factor = torch.tensor(values, dtype=torch.float32, device=x.device)
            return blend(degenerate(x, kind), x, factor)
        height, width = x.shape[-2:]
        matrices = [affine_matrix(kind, v, width, height) for v in values]
        return affine(x, torch.tensor(matrices, dtype=torch.float64, device=x.device), self.fill)

    def _point_lut(self, op_index: int, value: float) -> np.ndarray:
        """uint8 [256]: what timm's op does to each level (exact by construction)."""
        key = (op_index, value)
        if key not in self._luts:
            from PIL import Image

            op = self.rand_augment.ops[op_index]
            kind = OP_KINDS[self.rand_augment.kinds[op_index]]
            op_args = () if kind == "invert" else ((int(value),) if kind in _INTEGER_ARG else (value,))
            ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
            self._luts[key] = np.asarray(op.aug_fn(ramp, *op_args, **op.kwargs).convert("RGB"))[0, :, 0].copy()
        return self._luts[key]


def resample_weights(in_size: int, start: int, length: int, out_size: int) -> tuple[np.ndarray, int]:
    """Pillow's bilinear resampling weights from pixels [start, start + length) of a line of
    `in_size` to `out_size` pixels (`precompute_coeffs` and the 8-bit fixed point of
    Resample.c): (float64 [out_size, n], first input pixel). Like Pillow, the filter may
    reach past the box into the rest of the frame, and widens when it shrinks."""
    scale = length / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # bilinear: support 1, scaled when shrinking
    centers = start + (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    first, last = int(lo.min()), int(hi.max())
    pixels = np.arange(first, last)
    w = np.clip(1.0 - np.abs((pixels[None, :] - centers[:, None] + 0.5) / filter_scale), 0.0, None)
    w[(pixels[None, :] < lo[:, None]) | (pixels[None, :] >= hi[:, None])] = 0.0
    w /= w.sum(1, keepdims=True)
    precision = 1 << 22  # Pillow's PRECISION_BITS for 8-bit images: coefficients are rounded to it
    return np.trunc(w * precision + np.where(w < 0, -0.5, 0.5)) / precision, first


def resize_box(frames: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """Pillow's `resize((size, size), BILINEAR, box=...)` on frames uint8 [T, C, H, W] for
    box (top, left, h, w): a horizontal pass then a vertical one, each rounded to uint8 as
    Pillow does, as two matrix products over the pixels the filter reaches."""
    top, left, h, w = box
    wx, x0 = resample_weights(frames.shape[-1], left, w, size)
    wy, y0 = resample_weights(frames.shape[-2], top, h, size)
    region = frames[:, :, y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]].float()
    wx = torch.from_numpy(wx.T.astype(np.float32)).to(frames.device)  # [n_x, S]
    wy = torch.from_numpy(wy.astype(np.float32)).to(frames.device)  # [S, n_y]
    rows = torch.matmul(region, wx).add_(0.5).floor_().clamp_(0, 255)  # [T, C, n_y, S]
    return torch.matmul(wy, rows).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # [T, C, S, S]


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x uint8 [n, T, C, H, W] through per-(clip, frame, channel) tables: lut [n|1, T|1, C|1, 256]."""
    n, t, c, h, w = x.shape
    lut = lut.to(torch.uint8).expand(n, t, c, 256).reshape(n * t * c, 256)
    return torch.gather(lut, 1, x.reshape(n * t * c, h * w).long()).view(n, t, c, h, w)


def histograms(x: torch.Tensor) -> torch.Tensor:
    """int64 [n, T, C, 256]: each frame's histogram per channel."""
    n, t, c, h, w = x.shape
    groups = n * t * c
    offsets = torch.arange(groups, device=x.device).view(groups, 1) * 256
    counts = torch.bincount((x.reshape(groups, h * w).long() + offsets).view(-1), minlength=groups * 256)
    return counts.view(n, t, c, 256)


def autocontrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """Pillow's `ImageOps.autocontrast` table (cutoff 0) per histogram: int64 [..., 256]."""
    present = hist > 0
    lo = present.int().argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    levels = torch.arange(256, device=hist.device, dtype=torch.float64)
    scale = 255.0 / (hi - lo).clamp(min=1).double()
    stretched = torch.trunc(levels * scale + (-lo.double() * scale)).clamp(0, 255).long()
    return torch.where(hi <= lo, levels.long(), stretched)


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """Pillow's `ImageOps.equalize` table per histogram: int64 [..., 256]."""
    present = hist > 0
    hi = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, hi)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    levels = torch.arange(256, device=hist.device).expand_as(hist)
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    identity = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(identity, levels, lut)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (integer ITU-R 601-2 weights, rounded): int32 [n, T, 1, H, W]."""
    r, g, b = x.int().unbind(2)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(2)


def degenerate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The image Pillow's `ImageEnhance.<kind>` blends with, float32, broadcastable to x."""
    if kind == "brightness":
        return torch.zeros((), device=x.device)
    if kind == "color":
        return grey(x).float()
    if kind == "contrast":
        n, t = x.shape[:2]
        mean = grey(x).view(n, t, -1).double().mean(-1)
        return torch.floor(mean + 0.5).float().view(n, t, 1, 1, 1)
    # sharpness: ImageFilter.SMOOTH (3x3, centre 5, /13, rounded); the border rows and columns kept
    n, t, c, h, w = x.shape
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    frames = x.reshape(n * t * c, 1, h, w).float()
    smooth = frames.clone()
    inner = F.conv2d(frames, kernel.view(1, 1, 3, 3))
    smooth[:, :, 1:-1, 1:-1] = torch.floor(inner + 0.5).clamp_(0, 255)
    return smooth.view(n, t, c, h, w)


def blend(base: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.blend(base, x, factor)` for uint8: base + factor (x - base) in float32,
    clipped and truncated. factor: float32 [n]."""
    f = factor.view(-1, 1, 1, 1, 1)
    return (base + f * (x.float() - base)).clamp_(0, 255).floor_().to(torch.uint8)


def affine_matrix(kind: str, value: float, width: int, height: int) -> list[float]:
    """Pillow's AFFINE data (output pixel centre -> input point) for a timm geometric op."""
    if kind == "shear_x":
        return [1.0, value, 0.0, 0.0, 1.0, 0.0]
    if kind == "shear_y":
        return [1.0, 0.0, 0.0, value, 1.0, 0.0]
    if kind == "translate_x_rel":
        return [1.0, 0.0, value * width, 0.0, 1.0, 0.0]
    if kind == "translate_y_rel":
        return [1.0, 0.0, 0.0, 0.0, 1.0, value * height]
    if kind == "translate_x_abs":
        return [1.0, 0.0, value, 0.0, 1.0, 0.0]
    if kind == "translate_y_abs":
        return [1.0, 0.0, 0.0, 0.0, 1.0, value]
    # rotate: Image.rotate's matrix about the centre (its exact quarter turns give the same pixels)
    angle = -math.radians(value % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = width / 2.0, height / 2.0
    m[2], m[5] = m[0] * -cx + m[1] * -cy + cx, m[3] * -cx + m[4] * -cy + cy
    return m


def _cubic_weights(d: torch.Tensor) -> list[torch.Tensor]:
    """Pillow's transform bicubic (a = -1) weights of the 4 neighbours at fraction d."""
    d2, d3 = d * d, d * d * d
    return [-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2]


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Pillow's `Image.transform(AFFINE, resample=BICUBIC, fillcolor=fill)` on x uint8
    [n, T, C, H, W], one matrix per clip (float64 [n, 6])."""
    n, t, c, h, w = x.shape
    device = x.device
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    a = matrices.view(n, 6, 1, 1)
    x_in = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # [n, H, W]
    y_in = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (x_in >= 0) & (y_in >= 0) & (x_in < w) & (y_in < h)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = torch.floor(x_in), torch.floor(y_in)
    wx = [v.float().view(n, 1, h * w) for v in _cubic_weights(x_in - x0)]
    wy = [v.float().view(n, 1, h * w) for v in _cubic_weights(y_in - y0)]
    cols = [(x0.long() - 1 + k).clamp_(0, w - 1) for k in range(4)]
    rows = [(y0.long() - 1 + k).clamp_(0, h - 1) for k in range(4)]
    src = x.reshape(n, t * c, h * w).float()
    acc = torch.zeros(n, t * c, h * w, device=device)
    for j in range(4):
        row = torch.zeros_like(acc)
        for k in range(4):
            index = (rows[j] * w + cols[k]).view(n, 1, h * w).expand(n, t * c, h * w)
            row += wx[k] * torch.gather(src, 2, index)
        acc += wy[j] * row
    out = acc.clamp_(0, 255).floor_().view(n, t, c, h, w)
    fill_value = torch.tensor(fill, dtype=torch.float32, device=device).view(1, 1, c, 1, 1)
    return torch.where(inside.view(n, 1, 1, h, w), out, fill_value).to(torch.uint8)
