"""Clip augmentation, evaluation views (marscale.data.transforms) and mixup/normalize."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from marscale.core.clip import ClipConfig
from marscale.data import SSV2_FLIP_LABEL_PAIRS, DataConfig
from marscale.data.mixup import VideoMixup, normalize, smoothed_one_hot
from marscale.data.augment_params import erasing_params, rrc_params
from marscale.data.transforms import ClipRandAugment, EvalTransform, TrainTransform, crop_offsets, resize_short_side
from marscale.engine.config import load_train_config, presets


CLIP = ClipConfig(img_size=32)  # ImageNet mean and std


def _cfg(**kw) -> DataConfig:
    base = dict(train_shards="train", val_shards="val", short_side=32)
    base.update(kw)
    return DataConfig(**base)


def _still_clip(t: int = 5, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    frame = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.repeat(frame[None], t, axis=0)


@pytest.mark.parametrize("before_crop", [False, True])
def test_train_transform_keeps_identical_frames_identical(before_crop):
    transform = TrainTransform(_cfg(random_erasing=1.0, flip=True, rand_augment_before_crop=before_crop), CLIP)
    clip = _still_clip()
    plain = np.asarray(Image.fromarray(clip[0]).resize((32, 32), Image.BILINEAR))
    changed = 0
    for seed in range(25):
        out, _ = transform(clip, np.random.default_rng(seed))
        assert out.dtype == torch.uint8 and out.shape == (3, 5, 32, 32)
        for t in range(1, 5):
            torch.testing.assert_close(out[:, t], out[:, 0], rtol=0, atol=0)
        changed += not np.array_equal(out[:, 0].permute(1, 2, 0).numpy(), plain)
    assert changed == 25  # every draw augments (erasing is always on here)


def test_train_transform_is_a_function_of_the_generator():
    transform = TrainTransform(_cfg(), CLIP)
    clip = np.random.default_rng(3).integers(0, 256, size=(4, 40, 50, 3), dtype=np.uint8)
    a, _ = transform(clip, np.random.default_rng(7))
    b, _ = transform(clip, np.random.default_rng(7))
    c, _ = transform(clip, np.random.default_rng(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# Full-frame crop (scale 1, the frame's own aspect), no RandAugment, no erasing: only the
# flip changes the image.
NO_AUGMENT = dict(rand_augment="", random_erasing=0.0, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))


def test_flip_is_the_same_for_all_frames_says_so_and_can_be_disabled():
    clip = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    flipped = kept = 0
    for seed in range(30):
        out, was_flipped = TrainTransform(_cfg(flip=True, **NO_AUGMENT), CLIP)(clip, np.random.default_rng(seed))
        out = out.permute(1, 2, 3, 0).numpy()
        if was_flipped:
            np.testing.assert_array_equal(out, clip[:, :, ::-1])
            flipped += 1
        else:
            np.testing.assert_array_equal(out, clip)
            kept += 1
    assert flipped > 5 and kept > 5
    for seed in range(10):
        out, was_flipped = TrainTransform(_cfg(flip=False, **NO_AUGMENT), CLIP)(clip, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.permute(1, 2, 3, 0).numpy(), clip)
        assert not was_flipped


def test_flip_probability_is_one_half():
    transform = TrainTransform(_cfg(flip=True, flip_label_pairs=SSV2_FLIP_LABEL_PAIRS, **NO_AUGMENT), CLIP)
    clip = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    flips = sum(transform(clip, rng)[1] for _ in range(4000))
    # Binomial(4000, 0.5): std 32 flips; this seed gives 2006.
    assert abs(flips - 2000) < 100, flips


def test_ssv2_flip_label_map_swaps_only_the_listed_pairs():
    mapping = _cfg(flip_label_pairs=SSV2_FLIP_LABEL_PAIRS).flip_label_map
    after_flip = {label: mapping.get(label, label) for label in range(174)}
    changed = {label: new for label, new in after_flip.items() if new != label}
    assert changed == {86: 87, 87: 86, 93: 94, 94: 93, 166: 167, 167: 166}
    assert SSV2_FLIP_LABEL_PAIRS == ((86, 87), (93, 94), (166, 167))


@pytest.mark.parametrize("name", [name for name in presets() if "ssv2" in name])
def test_ssv2_presets_that_flip_swap_the_reference_pairs(name):
    # A preset that flips Something-Something v2 must swap left/right classes, with the
    # reference's pairs written out in the YAML (a preset that does not flip is left alone).
    data = load_train_config(name).data
    if data.flip:
        assert data.flip_label_pairs == SSV2_FLIP_LABEL_PAIRS, name


def _sizes_seen_by_rand_augment(monkeypatch, before_crop: bool) -> list[tuple[int, int]]:
    seen = []

    def record(self, images, ops):
        seen.extend(image.size for image in images)
        return images

    monkeypatch.setattr(ClipRandAugment, "apply", record)
    transform = TrainTransform(_cfg(rand_augment_before_crop=before_crop, random_erasing=0.0), CLIP)
    transform(_still_clip(t=3, h=48, w=64), np.random.default_rng(0))
    return seen


def test_rand_augment_placement_sees_the_full_frame_or_the_crop(monkeypatch):
    # PIL sizes are (width, height): the 64x48 decoded frame before the crop, the 32x32 crop after.
    assert _sizes_seen_by_rand_augment(monkeypatch, before_crop=True) == [(64, 48)] * 3
    assert _sizes_seen_by_rand_augment(monkeypatch, before_crop=False) == [(32, 32)] * 3


def test_rand_augment_before_crop_is_augment_then_crop():
    # The order written out by hand: RandAugment on the full frames, then the crop box, drawn
    # from the same generator in that order.
    frames = np.random.default_rng(4).integers(0, 256, size=(3, 48, 64, 3), dtype=np.uint8)
    cfg = _cfg(rand_augment_before_crop=True, random_erasing=0.0, flip=False)
    ra = ClipRandAugment(cfg.rand_augment, CLIP.img_size, CLIP.mean)
    differs = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        images = ra([Image.fromarray(f) for f in frames], rng)
        top, left, h, w = rrc_params(48, 64, cfg.rrc_scale, cfg.rrc_ratio, rng)
        expected = np.stack(
            [np.asarray(im.resize((32, 32), Image.BILINEAR, box=(left, top, left + w, top + h))) for im in images]
        )
        out, _ = TrainTransform(cfg, CLIP)(frames, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.permute(1, 2, 3, 0).numpy(), expected)
        after, _ = TrainTransform(dataclasses.replace(cfg, rand_augment_before_crop=False), CLIP)(
            frames, np.random.default_rng(seed)
        )
        differs += not torch.equal(out, after)
    assert differs == 6


def test_rand_augment_same_ops_per_frame_and_global_random_untouched():
    ra = ClipRandAugment("rand-m9-mstd0.5-inc1", 32, (0.485, 0.456, 0.406))
    frame = Image.fromarray(_still_clip(1, 32, 32)[0])
    random.seed(123)
    before = random.random()
    random.seed(123)
    for seed in range(20):
        out = ra([frame.copy() for _ in range(4)], np.random.default_rng(seed))
        arrays = [np.asarray(im) for im in out]
        for a in arrays[1:]:
            np.testing.assert_array_equal(a, arrays[0])
    assert random.random() == before  # the caller's random stream is restored


def test_every_rand_augment_op_works_at_every_magnitude():
    # timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which Pillow 13 rejects.
    ra = ClipRandAugment("rand-m9-mstd0.5-inc1", 32, (0.485, 0.456, 0.406))
    image = Image.fromarray(_still_clip(1, 32, 32)[0])
    for op in ra._ra.ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        for magnitude in (0, 5, 9, 10):
            op.magnitude = magnitude
            out = op(image)
            assert out.size == (32, 32) and out.mode == "RGB", (op.name, magnitude)
            if op.name == "PosterizeIncreasing" and magnitude == 10:
                assert not np.asarray(out).any()  # 0 bits kept: black, as TF's RandAugment


def test_rrc_params_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = rrc_params(240, 320, (0.08, 1.0), (0.75, 1.3333), rng)
        assert 0 <= top and top + h <= 240 and 0 <= left and left + w <= 320
        assert 0.08 * 0.9 <= h * w / (240 * 320) <= 1.0
    # Impossible area: falls back to the largest centred crop with the aspect clamped.
    assert rrc_params(100, 400, (1.0, 1.0), (1.0, 1.0), rng) == (0, 150, 100, 100)


def _erased(clip: np.ndarray, seed: int) -> np.ndarray:
    """`clip` (frames of img_size) through erasing alone: a full-frame crop, no flip, no RandAugment."""
    size = clip.shape[1]
    transform = TrainTransform(_cfg(flip=False, **{**NO_AUGMENT, "random_erasing": 1.0}),
                               ClipConfig(img_size=size))
    return transform(clip, np.random.default_rng(seed))[0].permute(1, 2, 3, 0).numpy()


def test_erasing_same_rectangle_and_noise_on_all_frames():
    clip = np.zeros((4, 32, 32, 3), np.uint8)
    for seed in range(10):
        out = _erased(clip, seed)
        mask = (out != 0).any(axis=-1)
        for t in range(1, 4):
            np.testing.assert_array_equal(out[t], out[0])
        ys, xs = np.nonzero(mask[0])
        area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 0.02 * 1024 * 0.5 <= area <= 1024 / 3 * 1.5
    rng = np.random.default_rng(0)
    rrc_params(200, 200, (1.0, 1.0), (1.0, 1.0), rng)
    rng.random()  # the erasing coin, drawn after the crop box
    rect = erasing_params(200, 200, rng)
    noise = _erased(np.zeros((1, 200, 200, 3), np.uint8), 0)
    top, left, h, w = rect
    patch = noise[0, top : top + h, left : left + w].reshape(-1, 3).astype(float)
    # Gaussian fill of mean 255 * ImageNet mean, std 255 * ImageNet std (timm's "pixel" mode).
    np.testing.assert_allclose(patch.mean(0), np.array([0.485, 0.456, 0.406]) * 255, atol=6)
    np.testing.assert_allclose(patch.std(0), np.array([0.229, 0.224, 0.225]) * 255, atol=6)


def test_crop_offsets():
    assert crop_offsets(48, 32, 3) == [0, 8, 16]
    assert crop_offsets(48, 32, 1) == [8]
    assert crop_offsets(48, 32, 2) == [0, 16]
    with pytest.raises(ValueError):
        crop_offsets(16, 32, 1)


@pytest.mark.parametrize("landscape", [True, False])
def test_eval_views_order_and_positions(landscape):
    cfg = _cfg(short_side=32, test_num_clips=2, test_num_crops=3)
    h, w = (40, 60) if landscape else (60, 40)
    frames = np.random.default_rng(0).integers(0, 256, size=(6, h, w, 3), dtype=np.uint8)
    clip_frames = np.array([[0, 1, 2], [3, 4, 5]])
    views = EvalTransform(cfg, CLIP)(frames, clip_frames)
    assert len(views) == 6
    resized = resize_short_side(frames, 32)
    assert resized.shape[1:3] == ((32, 48) if landscape else (48, 32))
    for clip in range(2):
        for crop, offset in enumerate([0, 8, 16]):
            view = views[clip * 3 + crop]
            assert view.dtype == torch.uint8 and view.shape == (3, 3, 32, 32)
            part = resized[clip_frames[clip]]
            part = part[:, :, offset : offset + 32] if landscape else part[:, offset : offset + 32, :]
            np.testing.assert_array_equal(view.permute(1, 2, 3, 0).numpy(), part)
    again = EvalTransform(cfg, CLIP)(frames, clip_frames)
    for a, b in zip(views, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_normalize_on_device_values():
    video = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(video, mean, std)
    expected = (video.float() / 255 - torch.tensor(mean).view(3, 1, 1, 1)) / torch.tensor(std).view(3, 1, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert normalize(video, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        normalize(video.float(), mean, std)


def test_mixup_blends_videos_and_targets():
    np.random.seed(0)
    mix = VideoMixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    x = torch.rand(4, 3, 2, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mix(x.clone(), labels)
    lam = float(((mixed - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0, 0])
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    y = smoothed_one_hot(labels, 5, 0.1)
    torch.testing.assert_close(targets, lam * y + (1 - lam) * y.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    # Smoothing: a class that is neither of the pair's labels keeps 0.1 / 5.
    torch.testing.assert_close(targets[:, 4][:3], torch.full((3,), 0.02))


def test_cutmix_box_is_spatial_and_the_same_on_every_frame():
    np.random.seed(1)
    mix = VideoMixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    b, c, t, h, w = 4, 3, 6, 16, 20
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, c, t, h, w).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    boxes = 0
    for _ in range(10):
        mixed, targets = mix(x.clone(), labels)
        changed = mixed != x  # [B, C, T, H, W]
        if not changed.any():  # lambda near 1 can give an empty box
            torch.testing.assert_close(targets, smoothed_one_hot(labels, 4, 0.1))
            continue
        boxes += 1
        # Every element takes the reversed batch's value inside the box.
        torch.testing.assert_close(mixed[changed], x.flip(0)[changed])
        box = changed[0, 0, 0]  # [H, W]
        for bi in range(b):
            for ci in range(c):
                for ti in range(t):
                    assert torch.equal(changed[bi, ci, ti], box)
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # a rectangle in (H, W)
        lam = 1 - box.sum().item() / (h * w)
        y = smoothed_one_hot(labels, 4, 0.1)
        torch.testing.assert_close(targets, lam * y + (1 - lam) * y.flip(0))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert boxes >= 3


def test_mixing_off_gives_smoothed_one_hot_and_odd_batches_fail():
    mix = VideoMixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.3)
    x = torch.rand(3, 3, 2, 4, 4)
    out, targets = mix(x.clone(), torch.tensor([2, 0, 1]))
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(targets[0], torch.tensor([0.1, 0.1, 0.8]))
    with pytest.raises(ValueError, match="even"):
        VideoMixup(3, 0.8, 1.0, 0.1)(torch.rand(3, 3, 2, 4, 4), torch.tensor([0, 1, 2]))
