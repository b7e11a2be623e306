"""The WebDataset loaders (marscale.data.loaders, marscale.data.stages) on the synthetic shards.

The session fixture `synthetic_shards` has 16 training videos in 8 shards and 8
evaluation videos in 4 shards (4 classes, 64x64, 32 frames). Clips here are 8 frames
of 32x32 to keep the tests fast.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch

from marscale.core.clip import ClipConfig
from marscale.data import DataConfig
from marscale.data import build_eval_loader as _build_eval_loader
from marscale.data import build_train_loader as _build_train_loader
from marscale.data.loaders import worker_batches
from marscale.data.shards import Manifest, ShardSet, key_to_index, load_manifest, sample_key, save_manifest

CLIP = ClipConfig(num_frames=8, sampling_interval=2, img_size=32)
NUM_CLASSES = 4  # the synthetic set's, and the model's in these tests
NO_SKIPS = {"read": 0, "incomplete": 0, "label": 0, "key": 0, "decode": 0}


def epoch_batches(cfg: DataConfig, world_size: int) -> int:
    """Loader batches per rank per epoch, written out here as the run plan computes them
    (one accumulation step): videos per epoch // (ranks x videos per batch)."""
    videos = cfg.samples_per_epoch or ShardSet.load(cfg.train_shards).num_videos
    return videos // (world_size * cfg.videos_per_batch)


def build_train_loader(cfg: DataConfig, clip: ClipConfig = CLIP, **kw):
    kw.setdefault("num_classes", NUM_CLASSES)
    return _build_train_loader(
        cfg, clip, ShardSet.load(cfg.train_shards), batches_per_epoch=epoch_batches(cfg, kw["world_size"]), **kw
    )


def build_eval_loader(cfg: DataConfig, clip: ClipConfig = CLIP, **kw):
    kw.setdefault("num_classes", NUM_CLASSES)
    return _build_eval_loader(cfg, clip, ShardSet.load(cfg.val_shards), **kw)


def _cfg(shards: dict[str, str], **kw) -> DataConfig:
    base = dict(
        train_shards=shards["train"],
        val_shards=shards["val"],
        short_side=32,
        batch_size=4,
        clips_per_video=2,
        test_num_clips=2,
        test_num_crops=3,
        eval_batch_size=5,
        num_workers=0,
        shuffle_buffer=4,
        flip=False,
    )
    base.update(kw)
    return DataConfig(**base)


def _batches(cfg: DataConfig, **kw) -> list[dict[str, torch.Tensor]]:
    return list(build_train_loader(cfg, **kw))


def _equal(x, y) -> bool:
    """Tensors, or dicts of them (the device path's "augment" parameters), equal exactly."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    return torch.equal(x, y)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _shard_keys(folder: str) -> dict[int, int]:
    """video index -> label, read straight from the tar files."""
    labels = {}
    for path in load_manifest(folder).shard_paths(folder):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    labels[key_to_index(key)] = int(tar.extractfile(member).read())
    return labels


def test_epoch_length_formula(synthetic_shards):
    # The epoch length itself is the run plan's (tests/test_config.py); the loader makes
    # exactly the batches it is given, split over its workers.
    cfg = _cfg(synthetic_shards)
    assert len(_build_train_loader(cfg, CLIP, ShardSet.load(cfg.train_shards), batches_per_epoch=5, epoch=0, rank=0,
                                   world_size=1, num_classes=NUM_CLASSES, start_batch=2)) == 3
    with pytest.raises(ValueError, match="batches_per_epoch must be >= 1"):
        _build_train_loader(cfg, CLIP, ShardSet.load(cfg.train_shards), batches_per_epoch=0, epoch=0, rank=0,
                            world_size=1, num_classes=NUM_CLASSES)
    # 10 batches over 4 workers: workers make 3, 3, 2, 2.
    assert [worker_batches(10, 4, w, 0)[1] for w in range(4)] == [3, 3, 2, 2]
    firsts = [worker_batches(10, 4, w, 5) for w in range(4)]
    # Worker w makes batches k * 4 + w; from batch 5 on: w0 {8}, w1 {5, 9}, w2 {6}, w3 {7}.
    assert firsts == [(2, 1), (1, 2), (1, 1), (1, 1)]


def test_train_batches_shapes_and_repeated_clips(synthetic_shards):
    cfg = _cfg(synthetic_shards)
    loader = build_train_loader(cfg, epoch=0, rank=0, world_size=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 8
    for batch in batches:
        assert set(batch) == {"video", "label"}
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (4, 3, 8, 32, 32)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
        # clips_per_video=2: consecutive clips come from one video, augmented differently.
        assert torch.equal(batch["label"][0::2], batch["label"][1::2])
        assert not torch.equal(batch["video"][0], batch["video"][1])
    assert set(torch.cat([b["label"] for b in batches]).tolist()) <= {0, 1, 2, 3}
    assert loader.skipped() == NO_SKIPS


def test_segment_sampling_end_to_end(synthetic_shards):
    cfg = _cfg(synthetic_shards, test_num_clips=2, test_num_crops=1)
    clip = ClipConfig(sampling="segment", num_frames=16, img_size=32)
    batch = next(iter(build_train_loader(cfg, clip, epoch=0, rank=0, world_size=1)))
    assert batch["video"].shape == (4, 3, 16, 32, 32)
    views = list(build_eval_loader(cfg, clip, rank=0, world_size=1))
    assert sum(len(b["view"]) for b in views) == 8 * 2
    assert set(torch.cat([b["view"] for b in views]).tolist()) == {0, 1}


def test_reference_segment_rule_reaches_the_decoder(synthetic_shards, monkeypatch):
    # 32-frame videos, 16 segments of 2 frames (linspace(0, 32, 17)): clip 0 takes each
    # segment's start (0, 2, ..., 30), clip 1 its end (2, 4, ..., 32 -> clamped to 31).
    recorder = _Recorder(monkeypatch)
    clip = ClipConfig(sampling="segment", segment_rule="reference", num_frames=16, img_size=32)
    cfg = _cfg(synthetic_shards, test_num_clips=2, test_num_crops=1)
    views = list(build_eval_loader(cfg, clip, rank=0, world_size=1))
    assert sum(len(b["view"]) for b in views) == 8 * 2
    assert len(recorder.requests) == 8
    for request in recorder.requests:
        np.testing.assert_array_equal(np.unique(request), list(range(0, 32, 2)) + [31])


def test_train_stream_is_reproducible_and_seeded(synthetic_shards):
    cfg = _cfg(synthetic_shards, num_workers=2)
    first = _batches(cfg, epoch=0, rank=0, world_size=1)
    assert len(first) == 8
    assert _same(first, _batches(cfg, epoch=0, rank=0, world_size=1))
    cfg0 = _cfg(synthetic_shards)
    base = _batches(cfg0, epoch=1, rank=0, world_size=2)
    assert len(base) == 4
    assert not _same(base, _batches(cfg0, epoch=2, rank=0, world_size=2))
    assert not _same(base, _batches(cfg0, epoch=1, rank=1, world_size=2))
    assert not _same(base, _batches(_cfg(synthetic_shards, seed=1), epoch=1, rank=0, world_size=2))


@pytest.mark.parametrize("num_workers, start_batch", [(2, 3), (2, 6), (0, 5)])
def test_resume_at_batch_gives_the_same_batches(synthetic_shards, num_workers, start_batch):
    cfg = _cfg(synthetic_shards, num_workers=num_workers, clips_per_video=1, batch_size=2, samples_per_epoch=14)
    full = _batches(cfg, epoch=3, rank=0, world_size=1)
    assert len(full) == 7
    resumed = build_train_loader(cfg, epoch=3, rank=0, world_size=1, start_batch=start_batch)
    assert len(resumed) == 7 - start_batch
    assert _same(full[start_batch:], list(resumed))


def test_eval_two_ranks_two_workers_see_every_view_once(synthetic_shards):
    cfg = _cfg(synthetic_shards, num_workers=2)
    expected = _shard_keys(synthetic_shards["val"])
    assert len(expected) == 8
    seen: dict[tuple[int, int], torch.Tensor] = {}
    batches_per_rank = []
    for rank in range(2):
        loader = build_eval_loader(cfg, rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == len(batches)
        batches_per_rank.append(batches)
        for batch in batches:
            assert batch["video"].dtype == torch.uint8 and batch["video"].shape[1:] == (3, 8, 32, 32)
            for i in range(len(batch["label"])):
                view_id = (int(batch["video_index"][i]), int(batch["view"][i]))
                assert view_id not in seen, f"view {view_id} read twice"
                seen[view_id] = batch["video"][i]
                assert int(batch["label"][i]) == expected[view_id[0]]
        assert loader.num_videos == 4
    assert set(seen) == {(v, k) for v in expected for k in range(6)}
    # Deterministic views: a second pass gives the same pixels.
    again = list(build_eval_loader(cfg, rank=0, world_size=2))
    assert _same(batches_per_rank[0], again)


def test_eval_needs_a_shard_per_reader(synthetic_shards):
    with pytest.raises(ValueError, match="4 shards but evaluation reads with 3 ranks x 2 workers"):
        build_eval_loader(_cfg(synthetic_shards, num_workers=2), rank=0, world_size=3)


def _rewrite(src: str, dst: str, edit, rename=lambda name: name) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = edit(member.name, tin.extractfile(member).read())
            if data is None:
                continue
            info = tarfile.TarInfo(rename(member.name))
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corrupt_shards(synthetic_shards, tmp_path_factory) -> dict:
    """Copies where the first sample of shard 0 has undecodable video bytes and the first
    sample of shard 1 has no .cls member. The training copy keeps only those two shards,
    so every shard it reads holds one broken and one good sample."""
    out: dict = {}
    for split in ("train", "val"):
        folder = str(tmp_path_factory.mktemp(f"corrupt_{split}"))
        manifest = load_manifest(synthetic_shards[split])
        for info in manifest.shards:
            shutil.copy(os.path.join(synthetic_shards[split], info.name), folder)
        bad = []
        for shard, broken_ext in ((manifest.shards[0], "mp4"), (manifest.shards[1], "cls")):
            path = os.path.join(folder, shard.name)
            with tarfile.open(path) as tar:
                first_key = min(m.name.split(".", 1)[0] for m in tar.getmembers())
            bad.append(key_to_index(first_key))

            def edit(name: str, data: bytes, first_key=first_key, broken_ext=broken_ext):
                key, ext = name.split(".", 1)
                if key != first_key or ext != broken_ext:
                    return data
                # A plausible MP4 header followed by garbage; or drop the label.
                return b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000) if ext == "mp4" else None

            _rewrite(os.path.join(synthetic_shards[split], shard.name), path, edit)
        if split == "train":
            manifest = Manifest(
                manifest.prefix, manifest.class_names, manifest.shards[:2], manifest.skipped, manifest.options
            )
        save_manifest(folder, manifest)
        out[split] = folder
        out[f"{split}_bad"] = bad
    return out


def test_corrupt_samples_are_skipped_and_counted_in_eval(corrupt_shards, synthetic_shards):
    cfg = _cfg({"train": corrupt_shards["train"], "val": corrupt_shards["val"]}, num_workers=2)
    loader = build_eval_loader(cfg, rank=0, world_size=1)
    videos = {int(v) for batch in loader for v in batch["video_index"]}
    expected = set(_shard_keys(synthetic_shards["val"])) - set(corrupt_shards["val_bad"])
    assert videos == expected
    assert loader.skipped() == {**NO_SKIPS, "incomplete": 1, "decode": 1}


def test_corrupt_samples_do_not_stop_training(corrupt_shards, caplog):
    cfg = _cfg(
        {"train": corrupt_shards["train"], "val": corrupt_shards["val"]},
        samples_per_epoch=6, batch_size=2, clips_per_video=1, shuffle_buffer=0,
    )
    loader = build_train_loader(cfg, epoch=0, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 3 and all(b["video"].shape[0] == 2 for b in batches)
    skipped = loader.skipped()
    # Each shard read gives a broken sample, then a good one: 6 good videos, 6 skips.
    assert skipped["decode"] + skipped["incomplete"] == 6
    assert skipped["decode"] >= 1 and skipped["incomplete"] >= 1 and skipped["read"] == 0
    # Each skip is logged with the sample key and the reason.
    bad_keys = {sample_key(i) for i in corrupt_shards["train_bad"]}
    messages = [r.getMessage() for r in caplog.records if r.name == "marscale.data.stages"]
    assert len(messages) == 6
    assert all(m.startswith("skipping sample ") and m.split()[2] in bad_keys for m in messages)
    assert any("(decode)" in m for m in messages) and any("(incomplete)" in m for m in messages)


def test_missing_shard_is_counted_as_read_error(synthetic_shards, tmp_path):
    folder = str(tmp_path / "val")
    shutil.copytree(synthetic_shards["val"], folder)
    manifest = load_manifest(folder)
    os.remove(os.path.join(folder, manifest.shards[2].name))
    with tarfile.open(os.path.join(synthetic_shards["val"], manifest.shards[2].name)) as tar:
        lost = {key_to_index(m.name.split(".", 1)[0]) for m in tar.getmembers()}
    cfg = _cfg({"train": synthetic_shards["train"], "val": folder}, test_num_clips=1, test_num_crops=1)
    loader = build_eval_loader(cfg, rank=0, world_size=1)
    videos = {int(v) for batch in loader for v in batch["video_index"]}
    assert videos == set(_shard_keys(synthetic_shards["val"])) - lost
    assert loader.skipped() == {**NO_SKIPS, "read": 1}


def test_key_to_index_takes_only_sample_keys():
    assert [key_to_index(sample_key(i)) for i in (0, 7, 10**9 + 3)] == [0, 7, 10**9 + 3]
    for key in ("../x", "video7", "00000001", "-00000001", "+00000001", " 000000001", "dir/000000001",
                "\uff10" * 9):  # full-width digits: int() would take them
        with pytest.raises(ValueError, match=re.escape(f"sample key {key!r} is not a marscale key")):
            key_to_index(key)


@pytest.fixture(scope="module")
def mislabelled_shards(synthetic_shards, tmp_path_factory) -> dict:
    """Copies with bad labels and keys. Training (shards 0 and 1 only): the first sample of
    each shard has label 99 (the model has 4 classes). Evaluation: the first sample of
    shard 0 has label 99, that of shard 1 the key "../x" (a tar member outside the shard's
    folder), that of shard 2 the key "video7"; out["bad"] maps each split's broken keys to
    their shard names."""
    out: dict = {"bad": {}}
    edits = {"train": {0: ("label", None), 1: ("label", None)},
             "val": {0: ("label", None), 1: ("key", "../x"), 2: ("key", "video7")}}
    for split, by_shard in edits.items():
        folder = str(tmp_path_factory.mktemp(f"mislabelled_{split}"))
        manifest = load_manifest(synthetic_shards[split])
        for info in manifest.shards:
            shutil.copy(os.path.join(synthetic_shards[split], info.name), folder)
        bad = {}
        for k, (what, new_key) in by_shard.items():
            name = manifest.shards[k].name
            path = os.path.join(folder, name)
            with tarfile.open(path) as tar:
                first = min(m.name.split(".", 1)[0] for m in tar.getmembers())

            def edit(member: str, data: bytes, first=first, what=what):
                return b"99" if what == "label" and member == f"{first}.cls" else data

            def rename(member: str, first=first, new_key=new_key):
                key, ext = member.split(".", 1)
                return f"{new_key}.{ext}" if new_key and key == first else member

            _rewrite(os.path.join(synthetic_shards[split], name), path, edit, rename)
            bad[new_key or first] = (what, name)
        if split == "train":
            manifest = Manifest(
                manifest.prefix, manifest.class_names, manifest.shards[:2], manifest.skipped, manifest.options
            )
        save_manifest(folder, manifest)
        out[split] = folder
        out["bad"][split] = bad
    return out


def _skip_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "marscale.data.stages"]


def test_training_skips_labels_past_the_models_classes(mislabelled_shards, caplog):
    # Before: label 99 reached mixup's one-hot targets and the step died with
    # "index 99 is out of bounds".
    from marscale.data import build_mixup, normalize

    cfg = _cfg(mislabelled_shards, samples_per_epoch=6, batch_size=2, clips_per_video=1, shuffle_buffer=0)
    loader = build_train_loader(cfg, epoch=0, rank=0, world_size=1)
    mixup = build_mixup(cfg, NUM_CLASSES)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert int(batch["label"].max()) < NUM_CLASSES
        mixed, target = mixup(normalize(batch["video"], CLIP.mean, CLIP.std), batch["label"])
        assert target.shape == (2, NUM_CLASSES)
    # Each shard read gives the mislabelled sample, then a good one.
    assert loader.skipped() == {**NO_SKIPS, "label": 6}
    messages = _skip_messages(caplog)
    assert len(messages) == 6
    for message in messages:
        key = message.split()[2]
        assert key in mislabelled_shards["bad"]["train"] and "(label)" in message
        assert "label 99 is outside the model's classes 0..3" in message
        assert mislabelled_shards["bad"]["train"][key][1] in message  # the shard file


def test_eval_skips_and_counts_bad_labels_and_keys(mislabelled_shards, synthetic_shards, caplog):
    # Before: label 99 was scored as a class the model cannot predict (top-5 87.5% for a
    # perfect model), and the key "../x" crashed evaluation in key_to_index, naming neither.
    cfg = _cfg(mislabelled_shards, test_num_clips=1, test_num_crops=1)  # in this process: caplog sees the log
    loader = build_eval_loader(cfg, rank=0, world_size=1)
    batches = list(loader)
    labels = {int(v): int(y) for b in batches for v, y in zip(b["video_index"], b["label"])}
    assert len(labels) == 8 - 3 and max(labels.values()) < NUM_CLASSES
    assert loader.skipped() == {**NO_SKIPS, "label": 1, "key": 2}
    messages = _skip_messages(caplog)
    assert len(messages) == 3
    for key, (what, shard) in mislabelled_shards["bad"]["val"].items():
        message, = [m for m in messages if m.startswith(f"skipping sample {key} ({what})")]
        assert shard in message
    assert any("'../x' is not a marscale key" in m for m in messages)


def test_a_video_the_decoder_cannot_read_is_skipped_with_its_message(synthetic_shards, tmp_path, caplog):
    # A 16-pixel-wide H.264 video: PyAV reads it, decord fails on every read.
    pytest.importorskip("decord")
    from shards_tools.synth import encode_video, render_clip

    folder = str(tmp_path / "val")
    shutil.copytree(synthetic_shards["val"], folder)
    name = load_manifest(folder).shards[1].name
    narrow = encode_video(render_clip(0, np.random.default_rng(0), 16, 32, 32), 16.0)
    with tarfile.open(os.path.join(synthetic_shards["val"], name)) as tar:
        first = min(m.name.split(".", 1)[0] for m in tar.getmembers())
    _rewrite(os.path.join(synthetic_shards["val"], name), os.path.join(folder, name),
             lambda member, data: narrow if member == f"{first}.mp4" else data)
    cfg = _cfg({"train": synthetic_shards["train"], "val": folder}, decoder="decord", test_num_clips=1,
               test_num_crops=1)
    loader = build_eval_loader(cfg, rank=0, world_size=1)
    assert sum(len(b["view"]) for b in loader) == 7
    assert loader.skipped() == {**NO_SKIPS, "decode": 1}
    message, = _skip_messages(caplog)
    assert message.startswith(f"skipping sample {first} (decode): decord: decord cannot decode frames")
    assert message.endswith(f"in {os.path.join(folder, name)}")


# --- MAR reference options: flip label pairs, independent windows, frame-rate sampling ---


class _Recorder:
    """Wraps `stages.open_sample`: counts the readers opened and the frames each decodes."""

    def __init__(self, monkeypatch):
        from marscale.data import stages

        self.opened = 0
        self.requests: list[np.ndarray] = []  # the indices of each get_frames call
        self.fps: list[float] = []
        real_open = stages.open_sample

        def open_sample(data, ext, meta, decoder, threads=1):
            reader = real_open(data, ext, meta, decoder, threads)
            real_get = reader.get_frames
            self.opened += 1
            self.fps.append(reader.fps)

            def get_frames(indices):
                self.requests.append(np.asarray(indices))
                return real_get(indices)

            reader.get_frames = get_frames
            return reader

        monkeypatch.setattr(stages, "open_sample", open_sample)


# Full-frame crops of the 64x64 synthetic frames, no RandAugment or erasing: a clip is the
# (possibly flipped) frames resized to 32x32, so its content can be read back.
NO_SPATIAL = dict(rand_augment="", random_erasing=0.0, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))


def _motion(video: torch.Tensor) -> tuple[float, float]:
    """(dx, dy) of the bright object's centroid from the first to the last frame of
    uint8 [C, T, H, W] (the synthetic object is lighter than its background)."""
    bright = (video.float().mean(0) > 130).float()  # [T, H, W]
    mass = bright.sum((1, 2)).clamp(min=1)
    ys = torch.arange(bright.shape[1], dtype=torch.float32)
    xs = torch.arange(bright.shape[2], dtype=torch.float32)
    cx = (bright.sum(1) * xs).sum(1) / mass
    cy = (bright.sum(2) * ys).sum(1) / mass
    return float(cx[-1] - cx[0]), float(cy[-1] - cy[0])


@pytest.mark.parametrize("pairs", [((0, 1),), ()])
def test_flipped_clips_get_the_mirrored_label(synthetic_shards, pairs):
    # Synthetic classes 0/1 are move_right/move_left (2/3: down/up): a flipped move_right
    # clip shows a move_left, and with the pair (0, 1) it must be labelled so. Whole-video
    # segment sampling makes the motion large; two clips a video flip independently.
    cfg = _cfg(synthetic_shards, flip=True, flip_label_pairs=pairs, samples_per_epoch=32, **NO_SPATIAL)
    clip = ClipConfig(sampling="segment", num_frames=8, img_size=32)
    agree = disagree = 0
    mirrored_pairs = 0
    for batch in build_train_loader(cfg, clip, epoch=0, rank=0, world_size=1):
        for video, label in zip(batch["video"], batch["label"].tolist()):
            dx, dy = _motion(video)
            if label in (0, 1):
                assert abs(dx) > 4, dx
                agree += (dx > 0) == (label == 0)
                disagree += (dx > 0) != (label == 0)
            else:  # up/down: a horizontal flip changes neither the motion nor the label
                assert abs(dy) > 4 and (dy > 0) == (label == 2), (dy, label)
        # The two clips of a video: the same frames, mirrored or not.
        for a, b, la, lb in zip(batch["video"][0::2], batch["video"][1::2], batch["label"][0::2], batch["label"][1::2]):
            if torch.equal(a, b.flip(-1)) and not torch.equal(a, b):
                mirrored_pairs += 1
                if pairs and int(la) in (0, 1):
                    assert int(la) + int(lb) == 1  # swapped for exactly one of them
                else:
                    assert la == lb
            else:
                assert torch.equal(a, b) and la == lb
    assert mirrored_pairs >= 4 and agree + disagree >= 8
    if pairs:
        assert disagree == 0
    else:  # a plain flip makes some move_right clips look like move_left: the test can see it
        assert disagree >= 2


def test_shared_windows_decode_one_window_per_video(synthetic_shards, monkeypatch):
    recorder = _Recorder(monkeypatch)
    cfg = _cfg(synthetic_shards, flip=False, samples_per_epoch=16, **NO_SPATIAL)
    batches = _batches(cfg, epoch=0, rank=0, world_size=1)
    assert recorder.opened == len(recorder.requests) == 16
    assert all(len(r) == 8 and np.all(np.diff(r) == 2) for r in recorder.requests)  # one dense window
    for batch in batches:  # no spatial augmentation: the two clips are the same pixels
        assert torch.equal(batch["video"][0::2], batch["video"][1::2])


def test_independent_windows_each_clip_its_own_window_decoded_once(synthetic_shards, monkeypatch):
    from marscale.data import stages

    recorder = _Recorder(monkeypatch)
    windows: list[list[np.ndarray]] = []
    real_windows = stages.train_windows

    def record_windows(*args, **kw):
        windows.append(real_windows(*args, **kw))
        return windows[-1]

    monkeypatch.setattr(stages, "train_windows", record_windows)
    cfg = _cfg(synthetic_shards, flip=False, samples_per_epoch=16, clip_windows="independent", **NO_SPATIAL)
    batches = _batches(cfg, epoch=0, rank=0, world_size=1)
    # One reader and one decoding pass per video, for the union of its two windows.
    assert recorder.opened == len(recorder.requests) == len(windows) == 16
    for pair, request in zip(windows, recorder.requests):
        assert len(pair) == 2
        for w in pair:  # each a valid dense window of the 32-frame video: 8 frames 2 apart
            assert len(w) == 8 and np.all(np.diff(w) == 2) and 0 <= w[0] and w[-1] <= 31
        np.testing.assert_array_equal(np.sort(request), np.unique(np.concatenate(pair)))
    assert sum(not np.array_equal(a, b) for a, b in windows) >= 12  # 18 possible starts
    clips = torch.cat([b["video"] for b in batches])
    different = [not torch.equal(a, b) for a, b in zip(clips[0::2], clips[1::2])]
    assert different == [not np.array_equal(a, b) for a, b in windows]


def test_independent_windows_resume_exactly(synthetic_shards):
    cfg = _cfg(
        synthetic_shards, clip_windows="independent", flip=True, flip_label_pairs=((0, 1),), samples_per_epoch=12
    )
    full = _batches(cfg, epoch=2, rank=0, world_size=1)
    assert len(full) == 6
    assert _same(full[4:], list(build_train_loader(cfg, epoch=2, rank=0, world_size=1, start_batch=4)))


def test_device_placement_gives_the_worker_paths_clips_labels_and_resume(synthetic_shards):
    # The same draws from the same stream: DeviceAugment on the device batches gives the
    # worker's clips (within the tolerance of tests/test_data_device_augment.py), and the
    # labels (flips swap 0 <-> 1 here) are the same.
    from marscale.data.device_augment import DeviceAugment

    cfg = _cfg(synthetic_shards, flip=True, flip_label_pairs=((0, 1),), random_erasing=0.5, samples_per_epoch=12)
    worker = _batches(cfg, epoch=1, rank=0, world_size=1)
    device = _batches(cfg, epoch=1, rank=0, world_size=1, augment_on="device")
    assert len(worker) == len(device) == 6
    augment = DeviceAugment(cfg, CLIP)
    flips = 0
    for w, d in zip(worker, device):
        assert d["video"].shape == (4, 8, 64, 64, 3) and d["video"].dtype == torch.uint8  # decoded windows
        assert torch.equal(w["label"], d["label"])
        out = augment(d["video"], d["augment"])
        assert out.shape == w["video"].shape == (4, 3, 8, 32, 32)
        assert (out.int() - w["video"].int()).abs().float().mean() <= 0.2
        flips += int(d["augment"]["flip"].sum())
    assert flips > 0
    resumed = build_train_loader(cfg, epoch=1, rank=0, world_size=1, start_batch=4, augment_on="device")
    assert _same(device[4:], list(resumed))


def test_fps_scaled_windows_use_the_decoders_frame_rate(synthetic_shards, monkeypatch):
    # The synthetic videos are 32 frames at 16 fps; at sampling_fps 30 a window of 8 frames
    # at interval 2 is 8 * 2 * 16 / 30 = 8.53 source frames long.
    from marscale.data import sampling

    recorder = _Recorder(monkeypatch)
    clip = ClipConfig(num_frames=8, sampling_interval=2, img_size=32, sampling_fps=30.0)
    cfg = _cfg(synthetic_shards, test_num_clips=3, test_num_crops=1)
    views = list(build_eval_loader(cfg, clip, rank=0, world_size=1))
    assert sum(len(b["view"]) for b in views) == 8 * 3
    assert recorder.fps == [pytest.approx(16.0)] * 8
    expected = sampling.eval_indices(clip, 32, 16.0, 3)
    np.testing.assert_array_equal(expected[0], [0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(expected[:, 0], [0, 11, 22])
    for request in recorder.requests:
        np.testing.assert_array_equal(np.sort(request), np.unique(expected))
    batch = next(iter(build_train_loader(cfg, clip, epoch=0, rank=0, world_size=1)))
    assert batch["video"].shape == (4, 3, 8, 32, 32)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_cut_by_their_ratios_carry_them(synthetic_shards, num_workers):
    """Under a token budget the loader sizes each batch by the ratios drawn for it and carries
    them ("ratios"), so the training step does not draw them again."""
    cfg = _cfg(synthetic_shards, clips_per_video=1, batch_size=3, num_workers=num_workers, mixup=0.0, cutmix=0.0)
    drawn = {0: (0.25, 0.5), 1: (0.25, 0.5, 0.75), 2: (0.75,), 3: (0.5, 0.5), 4: (0.25,), 5: (0.75, 0.75, 0.75)}
    batches = _batches(cfg, epoch=0, rank=0, world_size=1, batch_ratios=lambda k: drawn[k % 6])
    assert len(batches) == epoch_batches(cfg, 1)
    for k, batch in enumerate(batches):
        assert batch["ratios"].dtype == torch.float64 and tuple(batch["ratios"].tolist()) == drawn[k % 6]
        assert batch["video"].shape[0] == batch["label"].shape[0] == len(drawn[k % 6])
    assert "ratios" not in _batches(cfg, epoch=0, rank=0, world_size=1)[0]
