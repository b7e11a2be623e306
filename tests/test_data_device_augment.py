"""The training augmentation on the device (marscale.data.device_augment) against the worker's.

Both paths draw the same `ClipParams` (marscale.data.augment_params); these tests check
that for the same parameters the device path gives the worker path's (Pillow's) pixels
within measured tolerances, op by op and as a whole, that those tolerances still catch a
wrong parameter, and that the loader's device-path stream carries exactly the parameters
the worker path draws.

Measured (this file's frames: smooth gradients plus Gaussian noise of std 20):
- point ops, equalize, color/contrast/brightness/sharpness: identical (max difference 0);
- autocontrast: max 1 level (float rounding at a table boundary), mean < 0.001;
- rotate, shear, translate: max 1 level, mean < 0.005 (float32 weights);
- crop + resize (+ flip, erasing): max 2 levels, mean per clip <= 0.042 (float32 sums
  where Pillow sums in fixed point), at most 0.005% of values off by more than 1;
- the whole recipe: a level of difference before a threshold op (solarize, posterize)
  can become a large one after it, so single values differ by up to 128; the mean per
  clip stayed <= 0.045 (median 0.006) over 24 random 48x48 clips and <= 0.017 over 8
  224x224 crops of 320x240 frames, RandAugment before or after the crop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from marscale.core.clip import ClipConfig
from marscale.data import DataConfig
from marscale.data.augment_params import OP_KINDS, AugmentDraw, ClipParams
from marscale.data.config import resolve_augment_on
from marscale.data.device_augment import DeviceAugment, HostStaging
from marscale.data.stages import collate
from marscale.data.transforms import TrainTransform

CLIP = ClipConfig(img_size=48)
# Largest differences allowed, from the measurements above with some room.
OP_MAX, OP_MEAN = 1, 0.01
RESIZE_MAX, RESIZE_MEAN = 2, 0.1
RECIPE_MEAN = 0.2


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"train_shards": "train", "val_shards": "val", **kw})


def _frames(seed: int, t: int = 3, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 [t, h, w, 3]: smooth gradients (where interpolation is tame) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7 + seed) * 90 + 120, np.cos(yy / 5) * 80 + 110, (xx + yy) * 1.5 % 256], -1)
    return np.clip(base[None] + rng.normal(0, 20, (t, h, w, 3)), 0, 255).astype(np.uint8)


def _device(augment: DeviceAugment, frames: np.ndarray, params: ClipParams, num_layers: int) -> np.ndarray:
    batch = collate([{"video": torch.from_numpy(frames), "augment": params.to_tensors(num_layers, augment.size),
                      "label": 0}])
    return augment(batch["video"], batch["augment"])[0].numpy()  # [C, T, S, S]


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


# Arguments per image operation: the ends of timm's ranges at M10 and values inside.
ARGS = {
    "rotate": [-30.0, -13.7, 0.0, 4.2, 27.0], "posterize": [0, 1, 3, 4], "solarize": [0, 40, 128, 256],
    "solarize_add": [0, 30, 110], "color": [0.1, 0.5, 1.0, 1.9], "contrast": [0.1, 0.55, 1.81],
    "brightness": [0.1, 0.63, 1.9], "sharpness": [0.1, 0.5, 1.77], "shear_x": [-0.3, 0.0, 0.17, 0.3],
    "shear_y": [-0.3, 0.05, 0.3], "translate_x_rel": [-0.45, 0.0, 0.123, 0.45], "translate_y_rel": [-0.45, 0.31],
}
# A wrong argument the tolerance must notice (a tenth of the range or so).
WRONG = {
    "rotate": 3.0, "posterize": 1, "solarize": 26, "solarize_add": 11, "color": 0.2, "contrast": 0.2,
    "brightness": 0.2, "sharpness": 0.5, "shear_x": 0.03, "shear_y": 0.03, "translate_x_rel": 0.05,
    "translate_y_rel": 0.05,
}


def test_each_rand_augment_op_matches_pillow_and_a_wrong_argument_does_not():
    augment = DeviceAugment(_cfg(), CLIP)
    ra = augment.rand_augment
    assert {OP_KINDS[k] for k in ra.kinds} == set(ARGS) | {"auto_contrast", "equalize", "invert"}
    frames = _frames(0, h=48, w=48)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W]
    for op_index, op in enumerate(ra.ops):
        kind = OP_KINDS[ra.kinds[op_index]]
        for value in ARGS.get(kind, [0.0]):
            args = () if kind not in ARGS else ((int(value),) if isinstance(value, int) else (value,))
            pillow = np.stack([np.asarray(op.aug_fn(Image.fromarray(f), *args, **op.kwargs)) for f in frames])
            got = augment.apply_op(x, op_index, [float(value)])[0].permute(0, 2, 3, 1).numpy()
            worst, mean = _diff(got, pillow)
            assert worst <= OP_MAX and mean <= OP_MEAN, (op.name, value, worst, mean)
            if kind in WRONG and not (kind == "posterize" and value == 0):
                off = value + WRONG[kind] if value + WRONG[kind] <= max(ARGS[kind]) else value - WRONG[kind]
                wrong = augment.apply_op(x, op_index, [float(off)])[0].permute(0, 2, 3, 1).numpy()
                worst, mean = _diff(wrong, pillow)
                assert worst > OP_MAX or mean > OP_MEAN, (op.name, value, "a wrong argument passes")
        if kind not in ARGS:  # no argument: it must change the frames more than the tolerance
            assert _diff(augment.apply_op(x, op_index, [0.0])[0].permute(0, 2, 3, 1).numpy(), frames)[1] > OP_MEAN


def test_crop_resize_flip_and_erasing_match_and_a_shifted_box_does_not():
    cfg = _cfg(rand_augment="", random_erasing=0.5)
    host, augment, draw = TrainTransform(cfg, CLIP), DeviceAugment(cfg, CLIP), AugmentDraw(cfg, CLIP)
    flipped = erased = 0
    for seed in range(12):
        frames = _frames(seed)
        params = draw(48, 64, np.random.default_rng(seed))
        expected = host.apply(frames, params).numpy()
        worst, mean = _diff(_device(augment, frames, params, 0), expected)
        assert worst <= RESIZE_MAX and mean <= RESIZE_MEAN, (seed, worst, mean)
        flipped += params.flipped
        erased += params.erase is not None
        top, left, h, w = params.crop
        if left + w < 64:
            moved = dataclasses.replace(params, crop=(top, left + 1, h, w))
            assert _diff(_device(augment, frames, moved, 0), expected)[1] > RESIZE_MEAN
    assert flipped and erased  # both took part


@pytest.mark.parametrize("before_crop", [False, True])
def test_the_whole_recipe_matches_on_average(before_crop):
    cfg = _cfg(rand_augment_before_crop=before_crop, random_erasing=0.25)
    host, augment = TrainTransform(cfg, CLIP), DeviceAugment(cfg, CLIP)
    means = []
    for seed in range(16):
        frames = _frames(seed)
        params = host.draw(48, 64, np.random.default_rng(seed))
        got = _device(augment, frames, params, host.draw.num_layers)
        means.append(_diff(got, host.apply(frames, params).numpy())[1])
    assert max(means) <= RECIPE_MEAN, means


def test_batches_of_different_frame_sizes_are_padded_and_each_clip_keeps_its_own():
    cfg = _cfg(random_erasing=0.5)
    host, augment = TrainTransform(cfg, CLIP), DeviceAugment(cfg, CLIP)
    clips = [(_frames(1, h=48, w=64), 1), (_frames(2, h=60, w=52), 2), (_frames(3, h=50, w=50), 3)]
    items, expected = [], []
    for frames, seed in clips:
        params = host.draw(*frames.shape[1:3], np.random.default_rng(seed))
        items.append({"video": torch.from_numpy(frames), "augment": params.to_tensors(2, 48), "label": seed})
        expected.append(host.apply(frames, params).numpy())
    batch = collate(items)
    assert batch["video"].shape == (3, 3, 60, 64, 3) and batch["augment"]["size"].tolist() == [[48, 64], [60, 52],
                                                                                                [50, 50]]
    out = augment(batch["video"], batch["augment"])
    assert out.shape == (3, 3, 3, 48, 48) and out.dtype == torch.uint8
    for got, want in zip(out.numpy(), expected):
        assert _diff(got, want)[1] <= RECIPE_MEAN


# One argument per op of timm's default RandAugment ops, in `RandAugmentDraw.ops` order:
# AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast,
# Brightness, Sharpness, ShearX, ShearY, TranslateXRel, TranslateYRel.
OP_ARGS = [0.0, 0.0, 0.0, -13.7, 3.0, 128.0, 30.0, 0.5, 1.81, 0.63, 1.77, 0.17, -0.3, 0.123, -0.45]


def _every_op_batch(cfg: DataConfig, sizes: list[tuple[int, int]], layers: int) -> list[dict]:
    """Clips of the given frame sizes whose RandAugment layers run every op in turn
    (clip i, layer l: op (i * layers + l) mod 15), with their drawn crops, flips and erasing."""
    draw = AugmentDraw(cfg, CLIP)
    items = []
    for i, (h, w) in enumerate(sizes):
        tensors = draw(h, w, np.random.default_rng(i)).to_tensors(layers, CLIP.img_size)
        for layer in range(layers):
            op = (i * layers + layer) % len(OP_ARGS)
            tensors["ops"][layer], tensors["args"][layer] = op, OP_ARGS[op]
        items.append({"video": torch.from_numpy(_frames(i, h=h, w=w)), "augment": tensors, "label": i})
    return items


@pytest.mark.parametrize("before_crop", [False, True])
def test_a_batch_gives_each_clip_what_it_gets_alone(before_crop):
    # Batching pads frames (before the crop, RandAugment sees each clip's own frame in a
    # padded one), runs each op once over the clips that drew it and writes every erased
    # pixel at once: none of that may change a value.
    cfg = _cfg(rand_augment="rand-m9-n4-mstd0.5-inc1", rand_augment_before_crop=before_crop, random_erasing=0.5)
    augment = DeviceAugment(cfg, CLIP)
    sizes = [(48, 64), (60, 52), (50, 50), (48, 64), (56, 60), (49, 63), (60, 64), (52, 48)]
    items = _every_op_batch(cfg, sizes, layers=4)
    batch = collate(items)
    assert batch["video"].shape == (8, 3, 60, 64, 3)
    # Every op, drawn by 2 or 3 clips.
    assert sorted(batch["augment"]["ops"].view(-1).tolist()) == sorted([k % 15 for k in range(32)])
    assert int(batch["augment"]["flip"].sum()) not in (0, 8) and (batch["augment"]["erase"][:, 2] > 0).any()
    plan = augment.plan(batch["augment"], (60, 64))
    groups = plan.before_crop if before_crop else plan.after_crop
    assert len(groups) == 32 and all(g.members is not None for g in groups)  # no op drawn by every clip
    out = augment(batch["video"], batch["augment"])
    for item, got in zip(items, out):
        alone = collate([item])
        torch.testing.assert_close(got, augment(alone["video"], alone["augment"])[0], rtol=0, atol=0)
    if before_crop:  # the whole frames after RandAugment, not only the pixels the crops read
        cpu = torch.device("cpu")
        frames = augment.run_ops(batch["video"].permute(0, 1, 4, 2, 3), groups, plan.staging.to(cpu))
        for item, got in zip(items, frames):
            alone = collate([item])
            one = augment.plan(alone["augment"], alone["video"].shape[2:4])
            want = augment.run_ops(alone["video"].permute(0, 1, 4, 2, 3), one.before_crop, one.staging.to(cpu))[0]
            torch.testing.assert_close(got[..., : want.shape[-2], : want.shape[-1]], want, rtol=0, atol=0)


def test_the_parameters_cross_in_one_copy_and_must_be_on_the_host(monkeypatch):
    cfg = _cfg(rand_augment_before_crop=True, random_erasing=0.5)
    augment = DeviceAugment(cfg, CLIP)
    batch = collate(_every_op_batch(cfg, [(48, 64), (60, 52), (50, 50)], layers=2))
    copies = []
    to = HostStaging.to
    monkeypatch.setattr(HostStaging, "to", lambda self, device: copies.append(self.nbytes) or to(self, device))
    augment(batch["video"], batch["augment"])
    assert len(copies) == 1
    on_device = {**batch["augment"], "crop": batch["augment"]["crop"].to("meta")}
    with pytest.raises(ValueError, match="'crop' is on meta: keep the parameters on the host"):
        augment.plan(on_device, (60, 64))


def test_staged_arrays_come_back_as_they_went():
    staging = HostStaging()
    arrays = [np.arange(5, dtype=np.uint8), np.array([[1, -2], [3, 2**40]], dtype=np.int64),
              np.linspace(0, 1, 7, dtype=np.float32), np.array([np.pi, -1e300]), np.zeros((0, 3), np.int64)]
    slots = [staging.add(a) for a in arrays]
    assert all(slot.offset % 16 == 0 for slot in slots)
    staged = staging.to(torch.device("cpu"))
    assert staged.buffer.numel() == staging.nbytes
    for slot, array in zip(slots, arrays):
        torch.testing.assert_close(staged[slot], torch.from_numpy(array), rtol=0, atol=0)
    with pytest.raises(TypeError, match="cannot stage int32"):
        staging.add(np.zeros(2, np.int32))


def test_parameter_distributions_are_the_recipes():
    # The device path has no draws of its own: the worker draws with AugmentDraw for both.
    # These are its statistics over many clips, against the recipe's.
    cfg = _cfg()
    draw = AugmentDraw(cfg, ClipConfig(img_size=224))
    rng = np.random.default_rng(0)
    n = 3000
    params = [draw(240, 320, rng) for _ in range(n)]
    areas = np.array([p.crop[2] * p.crop[3] / (240 * 320) for p in params])
    # U(0.08, 1) when the box fits at the drawn aspect, else redrawn: large boxes fit less often.
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and 0.40 < areas.mean() < 0.47
    assert abs(np.mean([p.flipped for p in params]) - 0.5) < 0.03
    assert abs(np.mean([p.erase is not None for p in params]) - 0.25) < 0.03
    ops = [op for p in params for op, _ in p.ops_after_crop]
    assert abs(len(ops) / (2 * n) - 0.5) < 0.03  # each of the 2 layers applies with p = 0.5
    counts = np.bincount(ops, minlength=15)
    assert counts.min() > 0.75 * len(ops) / 15 and counts.max() < 1.25 * len(ops) / 15  # uniform choice
    rotations = np.abs([args[0] for p in params for op, args in p.ops_after_crop if op == 3])
    assert abs(rotations.mean() - 27.0) < 0.5 and abs(rotations.std() - 1.5) < 0.3  # |N(9, 0.5)| * 3 degrees


def test_auto_puts_augmentation_on_cuda_devices_only():
    assert resolve_augment_on("auto", "cuda") == "device"
    assert resolve_augment_on("auto", "cpu") == "worker"
    assert resolve_augment_on("device", "cpu") == "device" and resolve_augment_on("worker", "cuda") == "worker"
    with pytest.raises(ValueError, match="augment_on"):
        _cfg(augment_on="gpu")


def test_an_op_the_device_lacks_is_refused_with_the_fix():
    DeviceAugment(_cfg(rand_augment="rand-m9-n3-mstd0.5-tweights"), CLIP)  # other choices of the same ops: fine
    # timm's 3-Augment ops include a Gaussian blur, which the device path lacks; the worker path runs them.
    cfg = _cfg(rand_augment="rand-m9-mstd0.5-t3a")
    with pytest.raises(ValueError, match="GaussianBlur.*augment_on: worker"):
        DeviceAugment(cfg, CLIP)
    out, _ = TrainTransform(cfg, CLIP)(_frames(0), np.random.default_rng(0))
    assert out.shape == (3, 3, 48, 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_devices_clips():
    cfg = _cfg(random_erasing=0.5)
    host, augment = TrainTransform(cfg, CLIP), DeviceAugment(cfg, CLIP)
    items = []
    for seed in range(8):
        frames = _frames(seed)
        items.append({"video": torch.from_numpy(frames), "label": 0,
                      "augment": host.draw(48, 64, np.random.default_rng(seed)).to_tensors(2, 48)})
    batch = collate(items)
    on_cpu = augment(batch["video"], batch["augment"])
    on_cuda = augment(batch["video"].cuda(), batch["augment"]).cpu()
    assert (on_cuda.int() - on_cpu.int()).abs().float().mean() <= RECIPE_MEAN
