"""The training augmentation on the accelerator: parameters drawn in the worker, applied batched.

With ``data.augment_on: device`` the loader worker only decodes and cuts the temporal
window(s); each clip leaves it as the decoded frames, uint8 [T, H, W, 3], plus its
`augment_params.ClipParams` (drawn from the sample's generator with the code the worker
path uses, so the stream, resume and distributions are the same). `stages.collate`
stacks a batch: "video" uint8 [B, T, H, W, 3], zero-padded to the batch's largest frame
(each clip's own size is in its parameters), and "augment", the stacked tensors of
`ClipParams.to_tensors`. `DeviceAugment` turns that into uint8 [B, C, T, S, S] on the
batch's device, what `transforms.TrainTransform` makes from the same parameters; the
trainer then normalises and mixes as before (`marscale.data.prefetch` runs it a step
ahead, on a side stream on CUDA).

A batch runs in three parts, so that the host never waits for the device:

1. `plan` (host, numpy): everything the kernels need that follows from the drawn
   parameters alone - each clip's resize weights and source rows and columns, RandAugment's
   point tables, blend factors and affine matrices, the erased pixels and their noise, the
   clips each op applies to - packed into one byte buffer (`HostStaging`). The parameter
   tensors stay on the host; nothing is read back from the device.
2. the buffer's one host-to-device copy per batch (pinned and non-blocking on CUDA).
3. `apply` (device): kernels over the whole batch, in the recipe's order:
   RandAugment before the crop (`rand_augment_before_crop`, the K400 presets), on the
   padded full frames; crop + resize + flip; RandAugment after the crop (the default);
   random erasing. Each RandAugment layer runs each op once, over the clips that drew it;
   on padded frames the ops that look at the frame (histograms, contrast's mean,
   sharpness's kept border, the affine's clamps) use each clip's own size. Erasing is one
   indexed write for the batch. The crop and resize run per clip, as two matrix products
   over a view of its box (offsets known on the host, weights from the staged buffer; a
   flip is the horizontal weights' columns reversed): the boxes differ in size, and
   padding them to the batch's largest took 1.5x the CPU time in a batched form.

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

Batching changes no value: every batched op is per pixel or masked to each clip's own
frame, so a batch gives each clip what it gets alone, bit for bit (tested).
"""

from __future__ import annotations

import dataclasses
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
_ALIGN = 16  # bytes: every staged array starts aligned for its dtype (8) and vector loads
_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# --- one host-to-device copy per batch ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one staged array lies in the batch's buffer."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


class HostStaging:
    """Host arrays bound for the device, packed into one byte buffer: a batch's parameters
    cross in one copy, from pinned memory and non-blocking when the device is CUDA."""

    def __init__(self) -> None:
        self._arrays: list[tuple[int, np.ndarray]] = []
        self.nbytes = 0

    def add(self, array: np.ndarray) -> Slot:
        array = np.ascontiguousarray(array)
        if array.dtype not in _TORCH_DTYPES:
            raise TypeError(f"cannot stage {array.dtype} (uint8, int64, float32 or float64)")
        slot = Slot(self.nbytes, array.dtype, array.shape)
        self._arrays.append((self.nbytes, array))
        self.nbytes += -(-array.nbytes // _ALIGN) * _ALIGN
        return slot

    def to(self, device: torch.device) -> "Staged":
        """The buffer on `device`. On CUDA it is written into pinned memory (`pin_memory`
        needs CUDA, so only then) and copied without blocking the host: work queued after
        it on the current stream sees it, and the host goes on."""
        pinned = device.type == "cuda"
        host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pinned)
        flat = host.numpy()
        for offset, array in self._arrays:
            flat[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        return Staged(host.to(device, non_blocking=pinned))


class Staged:
    """A staged buffer on its device; `staged[slot]` is the array of `slot`, a view."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        nbytes = math.prod(slot.shape) * slot.dtype.itemsize
        return self.buffer[slot.offset : slot.offset + nbytes].view(_TORCH_DTYPES[slot.dtype]).view(slot.shape)


# --- the plan of one batch -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpGroup:
    """One RandAugment op over the n clips of a batch that drew it in one layer."""

    kind: str
    """Its image operation (`OP_KINDS`)."""
    members: Slot | None
    """int64 [n]: the clips, indices into the batch; None: every clip."""
    sizes: Slot
    """int64 [n, 2]: each clip's (height, width) in the (padded) frames it sees."""
    arg: Slot | None
    """The op's argument per clip: uint8 [n, 256] table (point ops), float32 [n] factor
    (blends), float64 [n, 6] matrix (affine ops); None for the histogram ops."""
    fill: Slot | None = None
    """float32 [3]: the colour of points outside the frame (affine ops)."""


@dataclasses.dataclass(frozen=True)
class CropResize:
    """One clip's RandomResizedCrop box resized to S x S (and flipped): two weight
    matrices over the rows and columns its resampling filter reaches."""

    top: int
    rows: int
    """The source rows: [top, top + rows) of the clip's frame."""
    left: int
    cols: int
    """The source columns: [left, left + cols)."""
    wy: Slot
    """float32 [S, rows]: vertical weights."""
    wx: Slot
    """float32 [cols, S]: horizontal weights, columns reversed for a flipped clip."""


@dataclasses.dataclass(frozen=True)
class Erase:
    """Every erased pixel of a batch (N of them), the same on every frame."""

    clips: Slot
    """int64 [N]: its clip."""
    pixels: Slot
    """int64 [N]: its position in the S x S crop, row-major."""
    values: Slot
    """uint8 [N, 3]: its noise."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What `DeviceAugment.apply` runs on one batch; its tensors wait in `staging`."""

    staging: HostStaging
    frame_size: tuple[int, int]
    """(H, W) of the padded frames the plan was made for."""
    before_crop: tuple[OpGroup, ...]
    crop: tuple[CropResize, ...]
    """Per clip."""
    after_crop: tuple[OpGroup, ...]
    erase: Erase | None


def _host(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The parameter tensors as numpy views; they must not be on the device (reading them
    would wait for it)."""
    for name, value in params.items():
        if value.device.type != "cpu":
            raise ValueError(f"augment parameter {name!r} is on {value.device}: keep the parameters on the host")
    return {name: value.numpy() for name, value in params.items()}


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
        return self.apply(video, self.plan(params, (video.shape[2], video.shape[3])))

    # --- host: the plan -------------------------------------------------------------

    def plan(self, params: dict[str, torch.Tensor], frame_size: tuple[int, int]) -> BatchPlan:
        """The kernels' inputs for a batch of `params` (host tensors, `ClipParams.to_tensors`
        stacked) whose frames are padded to `frame_size` (H, W). Host work only."""
        p = _host(params)
        staging = HostStaging()
        batch = len(p["size"])
        groups: tuple[OpGroup, ...] = ()
        if self.rand_augment is not None:
            # Before the crop the ops see each clip's full frame, after it the S x S crop.
            sizes = p["size"] if self.before_crop else np.full((batch, 2), self.size, dtype=np.int64)
            groups = self._op_groups(staging, p["ops"], p["args"], sizes)
        return BatchPlan(
            staging=staging,
            frame_size=(int(frame_size[0]), int(frame_size[1])),
            before_crop=groups if self.before_crop else (),
            crop=self._crop(staging, p["size"], p["crop"], p["flip"]),
            after_crop=() if self.before_crop else groups,
            erase=self._erase(staging, p["erase"], p["noise"]),
        )

    def _op_groups(
        self, staging: HostStaging, ops: np.ndarray, args: np.ndarray, sizes: np.ndarray
    ) -> tuple[OpGroup, ...]:
        """ops int64 [B, L] (op index, -1: none), args float64 [B, L], sizes int64 [B, 2]:
        layer by layer, each op once over the clips that drew it."""
        batch, layers = ops.shape
        out = []
        for layer in range(layers):
            drawn: dict[int, list[int]] = {}
            for clip, op_index in enumerate(ops[:, layer].tolist()):
                if op_index >= 0:
                    drawn.setdefault(op_index, []).append(clip)
            for op_index, members in drawn.items():
                values = args[members, layer].tolist()
                out.append(self._op_group(
                    staging, op_index, values, sizes[members], None if len(members) == batch else members
                ))
        return tuple(out)

    def _op_group(
        self, staging: HostStaging, op_index: int, values: list[float], sizes: np.ndarray, members: list[int] | None
    ) -> OpGroup:
        kind = OP_KINDS[self.rand_augment.kinds[op_index]]
        if kind in _POINT:
            arg = staging.add(np.stack([self._point_lut(op_index, v) for v in values]))
        elif kind in _HISTOGRAM:
            arg = None
        elif kind in _BLEND:
            arg = staging.add(np.array(values, dtype=np.float32))
        else:
            matrices = [affine_matrix(kind, v, w, h) for v, (h, w) in zip(values, sizes.tolist())]
            arg = staging.add(np.array(matrices, dtype=np.float64))
        return OpGroup(
            kind=kind,
            members=None if members is None else staging.add(np.array(members, dtype=np.int64)),
            sizes=staging.add(sizes.astype(np.int64)),
            arg=arg,
            fill=staging.add(np.array(self.fill, dtype=np.float32)) if kind in _AFFINE else None,
        )

    def _crop(
        self, staging: HostStaging, sizes: np.ndarray, crops: np.ndarray, flips: np.ndarray
    ) -> tuple[CropResize, ...]:
        out = []
        for (height, width), (top, left, h, w), flip in zip(sizes.tolist(), crops.tolist(), flips.tolist()):
            wy, y0 = resample_weights(height, top, h, self.size)  # [S, rows]
            wx, x0 = resample_weights(width, left, w, self.size)  # [S, cols]
            wx = wx[::-1] if flip else wx  # flipped: the output columns reversed
            out.append(CropResize(
                top=y0, rows=wy.shape[1], left=x0, cols=wx.shape[1],
                wy=staging.add(wy.astype(np.float32)), wx=staging.add(wx.T.astype(np.float32)),
            ))
        return tuple(out)

    def _erase(self, staging: HostStaging, erase: np.ndarray, noise: np.ndarray) -> Erase | None:
        clips, pixels, values = [], [], []
        for b, (top, left, h, w) in enumerate(erase.tolist()):
            if h and w:
                where = (top + np.arange(h))[:, None] * self.size + (left + np.arange(w))[None, :]
                clips.append(np.full(h * w, b, dtype=np.int64))
                pixels.append(where.reshape(-1))
                values.append(noise[b, : h * w])  # row-major, as `ClipParams.to_tensors` stored it
        if not clips:
            return None
        return Erase(
            clips=staging.add(np.concatenate(clips)), pixels=staging.add(np.concatenate(pixels).astype(np.int64)),
            values=staging.add(np.concatenate(values)),
        )

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

    # --- device: the kernels ----------------------------------------------------------

    def apply(self, video: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] on the device -> uint8 [B, C, T, S, S], as `plan` says.
        Launches kernels only: no host sync."""
        if tuple(video.shape[2:4]) != plan.frame_size:
            raise ValueError(f"the plan is for {plan.frame_size} frames, the video's are {tuple(video.shape[2:4])}")
        tensors = plan.staging.to(video.device)  # the batch's one host-to-device copy
        x = video.permute(0, 1, 4, 2, 3)  # [B, T, C, H, W], a view
        x = self.run_ops(x, plan.before_crop, tensors)
        crops = torch.empty(len(plan.crop), x.shape[1], 3, self.size, self.size, dtype=torch.uint8, device=x.device)
        for b, c in enumerate(plan.crop):  # [T, C, rows, cols] views -> [T, C, S, S]
            region = x[b, :, :, c.top : c.top + c.rows, c.left : c.left + c.cols]
            crops[b] = resize(region, tensors[c.wy], tensors[c.wx])
        x = self.run_ops(crops, plan.after_crop, tensors).contiguous()  # [B, T, C, S, S]
        if plan.erase is not None:
            e = plan.erase
            batch, frames = x.shape[:2]
            flat = x.view(batch, frames, 3, self.size * self.size)
            flat[tensors[e.clips], :, :, tensors[e.pixels]] = tensors[e.values].unsqueeze(1)  # [N, T, C] <- [N, 1, C]
        return x.permute(0, 2, 1, 3, 4).contiguous()  # [B, C, T, S, S]

    def run_ops(self, x: torch.Tensor, groups: tuple[OpGroup, ...], tensors: Staged) -> torch.Tensor:
        """x uint8 [B, T, C, H, W] through `groups` in order (x itself is left as it is)."""
        owned = False  # whether x is this call's own tensor, written in place
        for group in groups:
            if group.members is None:
                x, owned = self._run_op(x, group, tensors), True
                continue
            if not owned:  # one copy of the batch, not one per op
                x, owned = x.clone(memory_format=torch.contiguous_format), True
            index = tensors[group.members]
            x.index_copy_(0, index, self._run_op(x.index_select(0, index), group, tensors))
        return x

    def _run_op(self, x: torch.Tensor, group: OpGroup, tensors: Staged) -> torch.Tensor:
        kind, sizes = group.kind, tensors[group.sizes]
        if kind in _POINT:
            return apply_lut(x, tensors[group.arg].view(-1, 1, 1, 256))
        if kind == "auto_contrast":
            return apply_lut(x, autocontrast_lut(histograms(x, sizes)))
        if kind == "equalize":
            return apply_lut(x, equalize_lut(histograms(x, sizes)))
        if kind in _BLEND:
            return blend(degenerate(x, kind, sizes), x, tensors[group.arg])
        return affine(x, tensors[group.arg], tensors[group.fill], sizes)

    def apply_op(self, x: torch.Tensor, op_index: int, values: list[float]) -> torch.Tensor:
        """RandAugment op `op_index` with one argument per clip on whole frames x uint8
        [n, T, C, H, W] (a plan of one op)."""
        staging = HostStaging()
        sizes = np.tile(np.array(x.shape[-2:], dtype=np.int64), (x.shape[0], 1))
        group = self._op_group(staging, op_index, list(values), sizes, None)
        return self.run_ops(x, (group,), staging.to(x.device))


# --- the kernels ---------------------------------------------------------------------


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


def resize(region: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Pillow's `resize((S, S), BILINEAR, box=...)` of one clip's frames, given the pixels
    its filter reaches, region uint8 [T, C, rows, cols]: a horizontal pass (wx float32
    [cols, S]) then a vertical one (wy float32 [S, rows]), each rounded to uint8 as Pillow
    does. -> uint8 [T, C, S, S]."""
    across = torch.matmul(region.float(), wx).add_(0.5).floor_().clamp_(0, 255)  # [T, C, rows, S]
    return torch.matmul(wy, across).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x uint8 [n, T, C, H, W] through per-(clip, frame, channel) tables: lut [n|1, T|1, C|1, 256]."""
    n, t, c, h, w = x.shape
    lut = lut.to(torch.uint8).expand(n, t, c, 256).reshape(n * t * c, 256)
    return torch.gather(lut, 1, x.reshape(n * t * c, h * w).long()).view(n, t, c, h, w)


def frame_mask(sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """bool [n, H, W]: the pixels of each clip's own frame (sizes int64 [n, 2]) in frames
    padded to H x W."""
    ys = torch.arange(height, device=sizes.device).view(1, height, 1)
    xs = torch.arange(width, device=sizes.device).view(1, 1, width)
    return (ys < sizes[:, 0].view(-1, 1, 1)) & (xs < sizes[:, 1].view(-1, 1, 1))


def histograms(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """int64 [n, T, C, 256]: each frame's histogram per channel, over the clip's own
    (height, width) (sizes int64 [n, 2]) of the padded frames."""
    n, t, c, h, w = x.shape
    groups = n * t * c
    # Pixels past a clip's frame count in a 257th bin, dropped.
    inside = frame_mask(sizes, h, w).view(n, 1, h * w)
    values = torch.where(inside, x.reshape(n, t * c, h * w).long(), 256).view(groups, h * w)
    bins = (values + torch.arange(groups, device=x.device).view(groups, 1) * 257).view(-1)
    # scatter_add_ into a known size: CUDA's bincount reads the largest value back to the host.
    counts = torch.zeros(groups * 257, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, bins, torch.ones(1, dtype=torch.int64, device=x.device).expand_as(bins))
    return counts.view(n, t, c, 257)[..., :256]


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


def degenerate(x: torch.Tensor, kind: str, sizes: torch.Tensor) -> torch.Tensor:
    """The image Pillow's `ImageEnhance.<kind>` blends with, float32, broadcastable to x
    uint8 [n, T, C, H, W]; the mean grey and the kept border are those of each clip's own
    (height, width) (sizes int64 [n, 2]) of the padded frames."""
    n, t, c, h, w = x.shape
    if kind == "brightness":
        return torch.zeros((), device=x.device)
    if kind == "color":
        return grey(x).float()
    if kind == "contrast":
        inside = frame_mask(sizes, h, w).view(n, 1, 1, h, w)
        # A sum of integers is exact in float64, so this is the mean Pillow rounds.
        total = (grey(x) * inside).view(n, t, -1).double().sum(-1)
        mean = total / (sizes[:, 0] * sizes[:, 1]).view(n, 1).double()
        return torch.floor(mean + 0.5).float().view(n, t, 1, 1, 1)
    # sharpness: ImageFilter.SMOOTH (3x3, centre 5, /13, rounded); each clip's border rows
    # and columns kept. (Every smoothed value is k/13 for an integer k, never within 1/26
    # of a rounding boundary, so the convolution's summation order cannot change it.)
    kernel = torch.ones(1, 1, 3, 3, device=x.device)  # made on the device: no copy from the host
    kernel[:, :, 1, 1] = 5.0
    kernel /= 13.0
    frames = x.reshape(n * t * c, 1, h, w).float()
    smooth = frames.clone()
    inner = F.conv2d(frames, kernel)
    smooth[:, :, 1:-1, 1:-1] = torch.floor(inner + 0.5).clamp_(0, 255)
    # A clip's last row and column keep their values too (its first ones are the frame's).
    before_last = frame_mask(sizes - 1, h, w).view(n, 1, 1, h, w)
    return torch.where(before_last, smooth.view(n, t, c, h, w), frames.view(n, t, c, h, w))


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


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.transform(AFFINE, resample=BICUBIC, fillcolor=fill)` on x uint8
    [n, T, C, H, W], one matrix per clip (float64 [n, 6]), fill float32 [C], each clip's
    frame its own (height, width) (sizes int64 [n, 2]) of the padded frames."""
    n, t, c, h, w = x.shape
    device = x.device
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    height, width = sizes[:, 0].view(n, 1, 1), sizes[:, 1].view(n, 1, 1)
    a = matrices.view(n, 6, 1, 1)
    x_in = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # [n, H, W]
    y_in = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (x_in >= 0) & (y_in >= 0) & (x_in < width) & (y_in < height)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = torch.floor(x_in), torch.floor(y_in)
    wx = [v.float().view(n, 1, h * w) for v in _cubic_weights(x_in - x0)]
    wy = [v.float().view(n, 1, h * w) for v in _cubic_weights(y_in - y0)]
    cols = [torch.minimum((x0.long() - 1 + k).clamp_(min=0), width - 1) for k in range(4)]
    rows = [torch.minimum((y0.long() - 1 + k).clamp_(min=0), height - 1) for k in range(4)]
    src = x.reshape(n, t * c, h * w).float()
    acc = torch.zeros(n, t * c, h * w, device=device)
    for j in range(4):
        row = torch.zeros_like(acc)
        for k in range(4):
            index = (rows[j] * w + cols[k]).view(n, 1, h * w).expand(n, t * c, h * w)
            row += wx[k] * torch.gather(src, 2, index)
        acc += wy[j] * row
    out = acc.clamp_(0, 255).floor_().view(n, t, c, h, w)
    return torch.where(inside.view(n, 1, 1, h, w), out, fill.view(1, 1, c, 1, 1)).to(torch.uint8)
