"""Tests of `shards_tools`: synthetic data, annotation parsers, convert/verify/stats/synth.

Every conversion is checked end to end: convert -> verify -> read back with WebDataset
and compared with the source files, labels and class names.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import av
import numpy as np
import pytest
import webdataset as wds

import shards_tools
from shards_tools import annotations as ann
from shards_tools.cli import main as cli_main
from shards_tools.convert import ConvertOptions, convert
from shards_tools.plan import plan
from shards_tools.video import SkipVideo, container_truncation, probe_video
from shards_tools.write import ConvertError
from marscale.data.decode import available_decoders, open_video
from marscale.data.shards import SampleMeta, load_manifest, save_manifest, shard_name
from shards_tools.stats import collect_stats
import shards_tools.synth as synth_module
import shards_tools.synth_motion as synth_motion
from shards_tools.synth import SYNTH_CLASSES, TIME_REVERSED, encode_video, make_synthetic_dataset, render_clip
from shards_tools.synth_motion import MOTION_CLASSES, MOTION_TIME_REVERSED, render_motion_clip
from shards_tools.verify import verify

HAS_VPX = "libvpx" in av.codecs_available


# --------------------------------------------------------------------------- helpers


def _video_bytes(label: int, seed: int, frames: int = 12, size: int = 32, fmt: str = "mp4") -> bytes:
    clip = render_clip(label, np.random.default_rng(seed), size, size, frames)
    if fmt == "webm":
        # SSv2 ships VP8/VP9 in WebM; without libvpx keep the container check with H.264
        # in Matroska (the .webm container family).
        return encode_video(clip, 12, codec="libvpx", fmt="webm") if HAS_VPX else encode_video(clip, 12, fmt="matroska")
    return encode_video(clip, 12, fmt=fmt)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_back(out: str) -> list[dict]:
    """All samples of a shard set through WebDataset, in shard order."""
    manifest = load_manifest(out)
    samples = list(wds.WebDataset(manifest.shard_paths(out), shardshuffle=False))
    assert len(samples) == manifest.num_samples
    return samples


def _video_of(sample: dict) -> tuple[str, bytes]:
    exts = [k for k in sample if k in ("mp4", "webm", "mkv", "avi", "mov", "m4v")]
    assert len(exts) == 1, sorted(sample)
    return exts[0], sample[exts[0]]


def _shard_digests(out: str) -> dict[str, str]:
    return {
        os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in sorted(glob.glob(os.path.join(out, "*.tar")))
    }


def _options(**kw) -> ConvertOptions:
    kw.setdefault("prefix", "s")
    return ConvertOptions(**kw)


def _centroid_track(clip: np.ndarray) -> np.ndarray:
    """Per frame (x, y, area, orientation) of the pixels that differ from the background."""
    background = clip[0, 0, 0].astype(np.float64)
    out = []
    for frame in clip.astype(np.float64):
        mask = np.abs(frame - background).sum(-1) > 60
        ys, xs = np.nonzero(mask)
        x, y = xs.mean(), ys.mean()
        dx, dy = xs - x, ys - y
        orientation = 0.5 * np.arctan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean())
        out.append((x, y, mask.sum(), orientation))
    return np.array(out)


# --------------------------------------------------------------------------- synth


def test_render_clip_is_deterministic_and_classes_differ():
    clips = [render_clip(label, np.random.default_rng(3), 48, 32, 10) for label in range(len(SYNTH_CLASSES))]
    assert all(c.shape == (10, 32, 48, 3) and c.dtype == np.uint8 for c in clips)
    np.testing.assert_array_equal(clips[0], render_clip(0, np.random.default_rng(3), 48, 32, 10))
    assert not np.array_equal(clips[0], render_clip(0, np.random.default_rng(4), 48, 32, 10))
    for a in range(len(clips)):
        for b in range(a + 1, len(clips)):
            assert not np.array_equal(clips[a], clips[b]), (SYNTH_CLASSES[a], SYNTH_CLASSES[b])
    with pytest.raises(ValueError, match="out of range"):
        render_clip(len(SYNTH_CLASSES), np.random.default_rng(0), 32, 32, 4)


@pytest.mark.parametrize("label", [0, 2, 4])
def test_time_reversed_clip_is_the_partner_class(label):
    """move_right backwards is move_left (same draws): single frames cannot tell them apart."""
    rng_seed = 11
    forward = render_clip(label, np.random.default_rng(rng_seed), 64, 64, 16)
    partner = render_clip(TIME_REVERSED[label], np.random.default_rng(rng_seed), 64, 64, 16)
    np.testing.assert_array_equal(forward[::-1], partner)
    assert not np.array_equal(forward, partner)


def test_motion_matches_class_names_and_reverses():
    """Measured motion of each class (and of its reversal) has the named direction."""
    for seed in range(4):
        tracks = {
            label: _centroid_track(render_clip(label, np.random.default_rng(seed), 64, 64, 16))
            for label in range(len(SYNTH_CLASSES))
        }
        dx = {k: t[-1, 0] - t[0, 0] for k, t in tracks.items()}
        dy = {k: t[-1, 1] - t[0, 1] for k, t in tracks.items()}
        area_ratio = {k: t[-1, 2] / t[0, 2] for k, t in tracks.items()}
        assert dx[0] > 15 and dx[1] < -15 and abs(dy[0]) < 2  # right / left, large motion
        assert dy[2] > 15 and dy[3] < -15 and abs(dx[2]) < 2  # down / up
        assert area_ratio[4] > 4 and area_ratio[5] < 0.25  # grow / shrink
        # Orientation turns steadily one way (clockwise on screen = growing image angle).
        for label, sign in ((6, 1), (7, -1)):
            turn = np.diff(np.unwrap(tracks[label][:, 3], period=np.pi))
            assert (sign * turn > 0).sum() >= len(turn) - 1, (label, turn)
            reversed_turn = np.diff(np.unwrap(tracks[label][::-1, 3], period=np.pi))
            assert (sign * reversed_turn < 0).sum() >= len(reversed_turn) - 1


def test_encoded_synthetic_video_keeps_the_motion():
    clip = render_clip(0, np.random.default_rng(5), 64, 64, 16)
    data = encode_video(clip, 16.0)
    info = probe_video(data)
    assert (info.num_frames, info.width, info.height, info.fps, info.codec) == (16, 64, 64, 16.0, "h264")
    with av.open(io.BytesIO(data)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.abs(decoded.astype(int) - clip.astype(int)).mean() < 4
    track = _centroid_track(decoded)
    assert track[-1, 0] - track[0, 0] > 15
    assert probe_video(encode_video(clip, 16.0, gop=4)).num_frames == 16
    with pytest.raises(ValueError, match="even"):
        encode_video(np.zeros((2, 5, 6, 3), np.uint8), 10)


def test_probe_and_pyav_reader_agree_on_the_frame_rate():
    # One rule (marscale.data.decode.stream_frame_rate): the fps a shard's meta record
    # states is the fps the loader's PyAV reader samples with, NTSC rates included.
    data = encode_video(render_clip(0, np.random.default_rng(0), 32, 32, 10), 30000 / 1001)
    reader = open_video(data, "pyav")
    try:
        assert probe_video(data).fps == reader.fps == pytest.approx(29.97, abs=1e-3)
    finally:
        reader.close()


def test_make_synthetic_dataset_deterministic(tmp_path):
    kw = dict(num_classes=3, videos_per_class=2, val_videos_per_class=1, width=32, height=32, num_frames=8)
    a = make_synthetic_dataset(str(tmp_path / "a"), seed=1, **kw)
    b = make_synthetic_dataset(str(tmp_path / "b"), seed=1, workers=2, **kw)
    c = make_synthetic_dataset(str(tmp_path / "c"), seed=2, **kw)
    assert a["classes"] == list(SYNTH_CLASSES[:3]) and a["num_videos"] == {"train": 6, "val": 3}
    lines = open(a["lists"]["train"]).read().split("\n")
    assert lines[0] == "move_right/train_00000.mp4 0" and lines[-2] == "move_down/train_00001.mp4 2"
    assert open(tmp_path / "a" / "classes.txt").read().split() == list(SYNTH_CLASSES[:3])
    files = sorted(os.path.relpath(p, a["root"]) for p in glob.glob(f"{a['root']}/videos/*/*.mp4"))
    assert len(files) == 9
    for rel in files:
        ref = open(os.path.join(a["root"], rel), "rb").read()
        assert ref == open(os.path.join(b["root"], rel), "rb").read(), rel  # workers do not matter
        assert ref != open(os.path.join(c["root"], rel), "rb").read(), rel  # the seed does
    # Train and val clips of a class are different videos.
    assert open(f"{a['video_root']}/move_right/train_00000.mp4", "rb").read() != open(
        f"{a['video_root']}/move_right/val_00000.mp4", "rb"
    ).read()


# The demo's set as it was before other task families were added: the rendered frames
# of every class (with and without noise) and the files of a small default dataset.
ACTIONS_FRAMES_SHA256 = "6ba3ac93a08b0dc4dd4d1f28e3e1d69b825a5aac7a8585b2c8e2bad655fef6df"
ACTIONS_DATASET_SHA256 = "93a801014ef25824db747dd4cc5a071f4aea1ea78c67db5e4ba000aaa4917010"


def _tree_digest(root: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(f"{root}/**/*", recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def test_default_task_output_is_unchanged(tmp_path):
    frames = hashlib.sha256()
    for label in range(len(SYNTH_CLASSES)):
        frames.update(render_clip(label, np.random.default_rng([0, 0, label, 3]), 64, 64, 16).tobytes())
        frames.update(render_clip(label, np.random.default_rng([0, 1, label, 3]), 48, 32, 16, noise=5.0).tobytes())
    assert frames.hexdigest() == ACTIONS_FRAMES_SHA256
    make_synthetic_dataset(str(tmp_path), num_classes=4, videos_per_class=1, val_videos_per_class=1, num_frames=8)
    assert _tree_digest(str(tmp_path)) == ACTIONS_DATASET_SHA256


def test_motion_clip_is_deterministic_by_seed():
    clip = render_motion_clip(3, np.random.default_rng(7), 48, 32, 6)
    assert clip.shape == (6, 32, 48, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, render_motion_clip(3, np.random.default_rng(7), 48, 32, 6))
    assert not np.array_equal(clip, render_motion_clip(3, np.random.default_rng(8), 48, 32, 6))
    assert not np.array_equal(clip, render_motion_clip(4, np.random.default_rng(7), 48, 32, 6))
    with pytest.raises(ValueError, match="out of range"):
        render_motion_clip(len(MOTION_CLASSES), np.random.default_rng(0), 32, 32, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motion_single_frame_does_not_depend_on_the_class(seed):
    """Every draw is the same for every class (only velocities turn with it), and positions
    are drawn for the middle instant: with an odd frame count the middle frame of every
    class is the same image, noise included, while the clips differ. The frame is a torus,
    so every other frame is that frame's content shifted: as class-blind."""
    clips = [render_motion_clip(label, np.random.default_rng(seed), 64, 64, 7) for label in range(len(MOTION_CLASSES))]
    for clip in clips[1:]:
        np.testing.assert_array_equal(clip[3], clips[0][3])
        assert not np.array_equal(clip, clips[0])


@pytest.mark.parametrize("label", range(len(MOTION_CLASSES)))
def test_motion_clip_played_backwards_is_the_opposite_class(label):
    forward = render_motion_clip(label, np.random.default_rng(11), 64, 64, 8, noise=0.0)
    opposite = render_motion_clip(MOTION_TIME_REVERSED[label], np.random.default_rng(11), 64, 64, 8, noise=0.0)
    assert MOTION_TIME_REVERSED[MOTION_TIME_REVERSED[label]] == label != MOTION_TIME_REVERSED[label]
    np.testing.assert_array_equal(forward[::-1], opposite)


def test_motion_objects_drift_the_way_the_class_says(monkeypatch):
    """With the distractors removed, the measured drift of the objects has the class's
    direction (label x 45 degrees, image y down) and the named speed range."""
    monkeypatch.setattr(synth_motion, "NUM_DISTRACTORS", 0)
    monkeypatch.setattr(synth_motion, "NUM_SIGNAL", 1)
    for label, name in enumerate(MOTION_CLASSES):
        for seed in range(3):
            clip = render_motion_clip(label, np.random.default_rng(seed), 64, 64, 16, noise=0.0).astype(float)
            mask = clip.min(axis=-1) > 120  # the object is light, the background dark
            ys, xs = np.mgrid[0:64, 0:64] + 0.5
            # Circular means: the object wraps around the edges.
            track = np.array([[np.angle((np.exp(2j * np.pi * g[m] / 64)).mean()) for g in (xs, ys)] for m in mask])
            step = np.angle(np.exp(1j * np.diff(track, axis=0))).mean(axis=0) * 64 / (2 * np.pi)
            angle = np.degrees(np.arctan2(step[1], step[0])) % 360
            assert abs((angle - 45 * label + 180) % 360 - 180) < 3, (name, seed, angle)
            assert 1.4 < np.hypot(*step) < 3.1


def test_cli_synth_motion_task(tmp_path, capsys):
    out = str(tmp_path / "motion")
    assert cli_main(["synth", "--task", "motion", "--out", out, "--videos-per-class", "1", "--val-videos-per-class", "1",
                     "--size", "32x32", "--frames", "4"]) == 0
    assert open(f"{out}/classes.txt").read().split() == list(MOTION_CLASSES)
    assert len(glob.glob(f"{out}/videos/drift_*/*.mp4")) == 16
    with pytest.raises(ValueError, match="unknown task"):
        make_synthetic_dataset(str(tmp_path / "x"), task="shapes")
    with pytest.raises(ValueError, match="1..8 for task 'motion'"):
        make_synthetic_dataset(str(tmp_path / "x"), task="motion", num_classes=9)


# --------------------------------------------------------------------------- annotations


def test_annotation_parsers(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    k = tmp_path / "k.txt"
    k.write_text("a/x y.mp4 1\nb/z.mp4 0\n\n../out.mp4 0\nb/z.mp4 1\nc.mp4 7\n")
    parsed = ann.parse_kinetics(str(k), str(root))
    assert parsed.class_names == [str(i) for i in range(8)]
    assert parsed.pairs()[:2] == [("a/x y.mp4", 1), ("b/z.mp4", 0)]
    assert [i.problem for i in parsed.items] == ["", "", ann.OUTSIDE_ROOT, ann.DUPLICATE, ""]
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\n")
    parsed = ann.parse_kinetics(str(k), str(root), str(classes))
    assert parsed.class_names == ["zero", "one"]
    assert parsed.items[4].problem == ann.UNKNOWN_LABEL and parsed.items[4].label == -1

    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 0\na.mp4 cat\n")
    with pytest.raises(ann.AnnotationError, match=r"bad.txt:2: label 'cat' is not an integer"):
        ann.parse_kinetics(str(bad), str(root))
    bad.write_text("a.mp4 0\nno_label\n")
    with pytest.raises(ann.AnnotationError, match=r"bad.txt:2: expected 'PATH LABEL'"):
        ann.parse_csv(str(bad), str(root))

    csv = tmp_path / "train.csv"
    csv.write_text(f"{root}/v/a.mp4 0\nv/b.mp4 1\n/elsewhere/c.mp4 0\n")
    parsed = ann.parse_csv(str(csv), str(root))
    assert [(i.path, i.problem) for i in parsed.items] == [("v/a.mp4", ""), ("v/b.mp4", ""), ("", ann.OUTSIDE_ROOT)]

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Pushing [something] from left to right": "1", "Holding something": "0"}))
    items = tmp_path / "ssv2.json"
    items.write_text(json.dumps([
        {"id": "12", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "7", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]},
        {"id": "9", "label": "x", "template": "Spinning [something]", "placeholders": ["x"]},
    ]))
    parsed = ann.parse_ssv2(str(items), str(root), str(labels))
    assert parsed.class_names == ["Holding something", "Pushing something from left to right"]
    assert [(i.source, i.path, i.label, i.problem) for i in parsed.items] == [
        ("12", "12.webm", 1, ""), ("7", "7.webm", 0, ""), ("9", "9.webm", -1, ann.UNKNOWN_LABEL)]
    items.write_text(json.dumps([{"id": "1"}]))
    with pytest.raises(ann.AnnotationError, match=r"ssv2.json\[0\]"):
        ann.parse_ssv2(str(items), str(root), str(labels))

    for rel in ("b_cls/x.mp4", "a_cls/y.webm", "a_cls/sub/z.mp4", "a_cls/notes.txt", "a_cls/.DS_Store"):
        _write(str(root / "tree" / rel), b"x")
    parsed = ann.parse_folder(str(root / "tree"))
    assert parsed.class_names == ["a_cls", "b_cls"]
    # Every file is an entry (the converter keeps the videos and lists the rest as skipped).
    assert parsed.pairs() == [("a_cls/.DS_Store", 0), ("a_cls/notes.txt", 0), ("a_cls/y.webm", 0),
                              ("a_cls/sub/z.mp4", 0), ("b_cls/x.mp4", 1)]
    assert [i.problem for i in parsed.items] == [ann.HIDDEN, "", "", "", ""]


# --------------------------------------------------------------------------- convert round trips


def _check_round_trip(out: str, expected: dict[str, tuple[int, str]], root: str, class_names: list[str]) -> None:
    """Verify passes and every sample holds the source bytes, label and a true meta record."""
    report = verify(out)
    assert report.ok, report.summary()
    manifest = load_manifest(out)
    assert manifest.class_names == class_names
    seen = {}
    for sample in _read_back(out):
        ext, video = _video_of(sample)
        meta = SampleMeta.from_json(sample["json"])
        label = int(sample["cls"])
        assert meta.label == label and meta.label_name == class_names[label]
        rel, = [p for p, (_, src) in expected.items() if src == meta.source]
        assert label == expected[rel][0]
        assert video == open(os.path.join(root, rel), "rb").read()
        assert ext == rel.rsplit(".", 1)[-1]
        info = probe_video(video)
        assert (meta.num_frames, meta.width, meta.height, meta.codec) == (info.num_frames, info.width, info.height, info.codec)
        assert meta.duration == pytest.approx(info.num_frames / info.fps)
        seen[meta.source] = sample["__key__"]
    assert sorted(seen) == sorted(src for _, src in expected.values())
    assert len(set(seen.values())) == len(seen)


def test_kinetics_round_trip(synthetic_videos, synthetic_shards, tmp_path):
    root = os.path.join(synthetic_videos, "videos")
    class_names = open(os.path.join(synthetic_videos, "classes.txt")).read().split()
    for split, out in synthetic_shards.items():
        lines = open(os.path.join(synthetic_videos, f"{split}.txt")).read().split("\n")
        expected = {p: (int(l), p) for p, l in (line.split(" ") for line in lines if line)}
        _check_round_trip(out, expected, root, class_names)
        manifest = load_manifest(out)
        assert len(manifest.shards) >= 4 and all(s.num_samples == 2 for s in manifest.shards)
        assert manifest.class_counts() == {i: len(expected) // 4 for i in range(4)}
        assert manifest.skipped == []
    # Keys are global positions after the seeded shuffle: unshuffled, key order is file order.
    out = str(tmp_path / "plain")
    convert(_options(format="kinetics", root=root, annotations=os.path.join(synthetic_videos, "val.txt"), out=out,
                     samples_per_shard=3))
    samples = _read_back(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(8)]
    lines = open(os.path.join(synthetic_videos, "val.txt")).read().split()
    assert [SampleMeta.from_json(s["json"]).source for s in samples] == lines[0::2]
    assert load_manifest(out).class_names == ["0", "1", "2", "3"]  # no --classes: named by index


def test_csv_round_trip_with_absolute_paths(synthetic_videos, tmp_path):
    root = os.path.join(synthetic_videos, "videos")
    lines = open(os.path.join(synthetic_videos, "train.txt")).read().split("\n")
    pairs = [line.split(" ") for line in lines if line][:8]
    csv = tmp_path / "train.csv"
    # Half of the paths absolute (inside the root), as VideoMAE CSVs often are.
    csv.write_text("".join(f"{os.path.join(root, p) if i % 2 else p} {l}\n" for i, (p, l) in enumerate(pairs)))
    out = str(tmp_path / "out")
    convert(_options(format="csv", root=root, annotations=str(csv), out=out, max_shard_bytes=1))
    # A byte limit smaller than any video gives one video per shard.
    assert len(load_manifest(out).shards) == 8
    # Without --classes the classes are 0..max label found: the first 8 videos are classes 0, 1.
    _check_round_trip(out, {p: (int(l), p) for p, l in pairs}, root, ["0", "1"])


def test_ssv2_round_trip(tmp_path):
    root = tmp_path / "ssv2"
    templates = ["Moving [something] up", "Moving [something] down", "Pushing [something] from left to right"]
    labels = tmp_path / "something-something-v2-labels.json"
    # The labels file may write placeholders with or without brackets.
    labels.write_text(json.dumps({"Moving something up": "0", "Moving [something] down": "1",
                                  "Pushing [something] from left to right": "2"}))
    records, expected = [], {}
    for i in range(6):
        vid = str(1000 + i)
        _write(str(root / f"{vid}.webm"), _video_bytes(i % 3, seed=i, fmt="webm"))
        records.append({"id": vid, "label": "x", "template": templates[i % 3], "placeholders": ["x"]})
        expected[f"{vid}.webm"] = (i % 3, vid)
    items = tmp_path / "train.json"
    items.write_text(json.dumps(records))
    out = str(tmp_path / "out")
    result = convert(_options(format="ssv2", root=str(root), annotations=str(items), labels=str(labels), out=out,
                              samples_per_shard=4, workers=2))
    assert result.manifest.num_samples == 6 and len(result.manifest.shards) == 2
    class_names = ["Moving something up", "Moving something down", "Pushing something from left to right"]
    _check_round_trip(out, expected, str(root), class_names)
    if HAS_VPX:
        assert {SampleMeta.from_json(s["json"]).codec for s in _read_back(out)} == {"vp8"}


def test_folder_round_trip_and_stats(tmp_path, capsys):
    root = tmp_path / "tree"
    expected = {}
    for label, name in enumerate(["b_walk", "a_run"]):
        for i in range(3):
            rel = f"{name}/{i}.mp4"
            _write(str(root / rel), _video_bytes(label, seed=10 * label + i, frames=8 + i))
            expected[rel] = (1 - label, rel)  # classes sort by name: a_run is 0
    out = str(tmp_path / "out")
    convert(_options(format="folder", root=str(root), out=out, samples_per_shard=4, shuffle_seed=3))
    _check_round_trip(out, expected, str(root), ["a_run", "b_walk"])

    stats = collect_stats(out)
    assert stats["num_samples"] == 6 and stats["num_shards"] == 2
    assert [(c["name"], c["count"]) for c in stats["classes"]] == [("a_run", 3), ("b_walk", 3)]
    assert stats["resolutions"] == {"32x32": 6} and stats["fps"] == {"12": 6}
    assert stats["num_frames"]["min"] == 8 and stats["num_frames"]["max"] == 10
    assert stats["duration_s"]["total"] == pytest.approx(2 * (8 + 9 + 10) / 12)
    assert cli_main(["stats", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 6
    assert cli_main(["stats", out]) == 0
    table = capsys.readouterr().out
    assert "a_run" in table and "50.00%" in table and "32x32: 6" in table


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "root"
    good = {f"good/{i}.mp4": i % 2 for i in range(3)}
    for seed, (rel, label) in enumerate(good.items()):
        _write(str(root / rel), _video_bytes(label, seed=seed))
    mp4 = _video_bytes(0, seed=20)
    webm = _video_bytes(1, seed=21, fmt="webm")
    _write(str(root / "bad/truncated.webm"), webm[: len(webm) // 2])
    _write(str(root / "bad/truncated.mp4"), mp4[: int(len(mp4) * 0.9)])
    _write(str(root / "bad/random.mp4"), np.random.default_rng(0).bytes(4000))
    _write(str(root / "bad/empty.mp4"), b"")
    _write(str(root / "bad/text.mpg"), mp4)  # a real video in a container shards do not store as it is
    _write(str(tmp_path / "outside.mp4"), mp4)  # a valid video, but outside the root
    lines = [f"{rel} {label}" for rel, label in good.items()] + [
        "bad/truncated.webm 1",
        "bad/truncated.mp4 0",
        "bad/random.mp4 0",
        "bad/empty.mp4 1",
        "bad/missing.mp4 0",
        "good/0.mp4 5",  # unknown label (checked before the duplicate)
        "../outside.mp4 0",
        f"{tmp_path}/outside.mp4 1",
        "good/1.mp4 1",  # duplicate
        "bad/text.mpg 0",
    ]
    annotations = tmp_path / "list.txt"
    annotations.write_text("\n".join(lines) + "\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    out = str(tmp_path / "out")
    result = convert(_options(format="kinetics", root=str(root), annotations=str(annotations), classes=str(classes),
                              out=out, samples_per_shard=2))
    reasons = {(s.source, s.reason) for s in result.manifest.skipped}
    assert reasons == {
        ("bad/truncated.webm", "truncated"),
        ("bad/truncated.mp4", "truncated"),
        ("bad/random.mp4", "unreadable"),
        ("bad/empty.mp4", "empty"),
        ("bad/missing.mp4", "missing"),
        ("good/0.mp4", "unknown_label"),
        ("../outside.mp4", "outside_root"),
        (f"{tmp_path}/outside.mp4", "outside_root"),
        ("good/1.mp4", "duplicate"),
    }
    unknown, = [s for s in result.manifest.skipped if s.reason == "unknown_label"]
    assert "list.txt:9" in unknown.detail and "'5'" in unknown.detail
    assert result.manifest.num_samples == 4
    assert verify(out).ok
    # The .mpg is kept, re-encoded to H.264 in MP4 at its own size.
    kept = {m.source: m for m in (SampleMeta.from_json(s["json"]) for s in _read_back(out))}
    assert sorted(kept) == sorted([*good, "bad/text.mpg"])
    assert kept["bad/text.mpg"].reencoded and kept["bad/text.mpg"].codec == "h264"
    assert not any(kept[rel].reencoded for rel in good)
    summary = result.summary()
    assert "4 samples" in summary and "skipped: 9" in summary and "truncated" in summary
    # A shard whose every video is bad is left out rather than written empty.
    assert all(s.num_samples > 0 for s in result.manifest.shards)

    # Re-encoding everything skips the same broken ones.
    out_re = str(tmp_path / "out_re")
    result = convert(_options(format="kinetics", root=str(root), annotations=str(annotations), classes=str(classes),
                              out=out_re, samples_per_shard=2, reencode=True))
    assert result.manifest.num_samples == 4
    assert {(s.source, s.reason) for s in result.manifest.skipped} == reasons
    assert verify(out_re).ok


def _encode_png_mov(frames: np.ndarray, fps: int = 12) -> bytes:
    """PNG frames in QuickTime: PyAV reads it, decord does not (at 32 pixels wide)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_videos_the_default_decoder_cannot_read_are_skipped(tmp_path, monkeypatch):
    # Before: 16 and 24 pixel wide videos converted and verified, then failed every read in
    # training with decord, then the default decoder. Here decord is made the default.
    pytest.importorskip("decord")
    import shards_tools.convert as convert_module

    monkeypatch.setattr(convert_module, "resolve_decoder", lambda name: "decord")
    root = tmp_path / "root"
    lines = []
    for i, width in enumerate((16, 24, 32)):
        clip = render_clip(i % 2, np.random.default_rng(i), width, 32, 12)
        _write(str(root / f"w{width}.mp4"), encode_video(clip, 12))
        lines.append(f"w{width}.mp4 {i % 2}")
    # decord cannot read this one either, but it can once re-encoded to H.264: kept, re-encoded.
    _write(str(root / "png.mov"), _encode_png_mov(render_clip(0, np.random.default_rng(9), 32, 32, 12)))
    lines.append("png.mov 0")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    for reencode in (False, True):
        out = str(tmp_path / f"out_{reencode}")
        result = convert(_options(format="kinetics", root=str(root), annotations=str(tmp_path / "list.txt"),
                                  out=out, reencode=reencode))
        skipped = {s.source: s for s in result.manifest.skipped}
        assert sorted(skipped) == ["w16.mp4", "w24.mp4"]
        assert all(s.reason == "decoder" and s.detail.startswith("decord: decord cannot decode frames")
                   for s in skipped.values())
        kept = {m.source: m for m in (SampleMeta.from_json(x["json"]) for x in _read_back(out))}
        assert sorted(kept) == ["png.mov", "w32.mp4"]
        assert kept["png.mov"].reencoded and kept["png.mov"].codec == "h264" and kept["png.mov"].width == 32
        assert kept["w32.mp4"].reencoded == reencode
        assert verify(out).ok
        assert "decoder" in result.summary()


def test_verify_reads_every_video_with_every_installed_decoder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("decord")
    import shards_tools.convert as convert_module

    root = tmp_path / "root"
    for width in (16, 32):
        _write(str(root / f"w{width}.mp4"), encode_video(render_clip(0, np.random.default_rng(0), width, 32, 12), 12))
    (tmp_path / "list.txt").write_text("w16.mp4 0\nw32.mp4 0\n")
    # Shards whose records claim every decoder reads them exactly (as if the converter had not checked).
    monkeypatch.setattr(convert_module, "exact_decoders", lambda data, info: (available_decoders(), {}))
    out = str(tmp_path / "out")
    convert(_options(format="kinetics", root=str(root), annotations=str(tmp_path / "list.txt"), out=out))
    assert cli_main(["verify", out]) == 1
    printed = capsys.readouterr().out
    problem, = [line for line in printed.splitlines() if "MISMATCH" in line]
    assert problem.startswith("  MISMATCH: s-000000.tar: sample 000000000 (w16.mp4): reading with the decord decoder "
                              "gives wrong frames: decord cannot decode frames [0]")
    assert verify(out, decode=False).ok


def test_inputs_without_any_sample_are_errors(tmp_path, capsys):
    # Before: each of these "succeeded" with a manifest of 0 samples and exit status 0.
    root = tmp_path / "root"
    root.mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    missing = tmp_path / "missing.txt"
    missing.write_text("a.mp4 0\nb.mp4 1\n")
    _write(str(root / "junk.mp4"), b"not a video")
    junk = tmp_path / "junk.txt"
    junk.write_text("junk.mp4 0\n")
    (tmp_path / "no_videos" / "a_class").mkdir(parents=True)
    ssv2 = tmp_path / "ssv2.json"
    ssv2.write_text("[]")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Holding something": "0"}))
    cases = [
        (["--format", "kinetics", "--annotations", str(empty), "--root", str(root)], f"{empty}: no entries"),
        (["--format", "csv", "--annotations", str(empty), "--root", str(root)], f"{empty}: no entries"),
        (["--format", "ssv2", "--annotations", str(ssv2), "--labels", str(labels), "--root", str(root)],
         f"{ssv2}: no entries"),
        (["--format", "folder", "--root", str(root)], f"{root}: no class folders"),
        (["--format", "folder", "--root", str(tmp_path / "no_videos")],
         f"{tmp_path / 'no_videos'}: no files in its class folders"),
        (["--format", "kinetics", "--annotations", str(missing), "--root", str(root)],
         "no usable video: 2 listed, all skipped: 2 missing (e.g. a.mp4: missing"),
        (["--format", "kinetics", "--annotations", str(junk), "--root", str(root)],
         "no video could be stored: 1 listed, all skipped: 1 unreadable (e.g. junk.mp4: unreadable"),
    ]
    for i, (args, message) in enumerate(cases):
        out = str(tmp_path / f"out{i}")
        assert cli_main(["convert", *args, "--out", out, "--prefix", "p"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("marscale-shards convert: error: ") and message in err, (args, err)
        assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_container_truncation_detection():
    mp4, webm = _video_bytes(0, seed=1), _video_bytes(1, seed=2, fmt="webm")
    assert container_truncation(mp4) is None and container_truncation(webm) is None
    for data in (mp4, webm):
        for cut in (len(data) // 3, len(data) - 1):
            assert container_truncation(data[:cut]) is not None
            with pytest.raises(SkipVideo) as e:
                probe_video(data[:cut])
            assert e.value.reason == "truncated"
    assert container_truncation(mp4 + b"\0\0\0") is None  # zero padding after the last box


# --------------------------------------------------------------------------- resume & determinism


_KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from shards_tools import convert as c, write as w

    calls = 0
    write_sample = w._add_sample

    def dies_mid_shard(tar, done):
        global calls
        calls += 1
        if calls > int(sys.argv[2]):
            os._exit(3)  # like SIGKILL: no clean-up runs
        write_sample(tar, done)

    w._add_sample = dies_mid_shard
    c.convert(c.ConvertOptions(**json.loads(sys.argv[1])), progress=False)
    """
)


def test_interrupted_convert_resumes(synthetic_videos, tmp_path):
    kw = dict(format="kinetics", root=os.path.join(synthetic_videos, "videos"),
              annotations=os.path.join(synthetic_videos, "train.txt"),
              classes=os.path.join(synthetic_videos, "classes.txt"), prefix="train", samples_per_shard=3,
              shuffle_seed=5)
    reference = str(tmp_path / "reference")
    convert(ConvertOptions(out=reference, **kw))

    out = str(tmp_path / "resumed")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(shards_tools.__file__)))
    # Die while writing the second sample of shard 1: shard 0 is complete, shard 1 partial.
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(dict(out=out, **kw)), "4"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    names = sorted(os.listdir(out))
    assert "train-000000.tar" in names and ".train-000001.tar.partial" in names
    assert "train-000001.tar" not in names and "manifest.json" not in names
    first = os.stat(os.path.join(out, "train-000000.tar"))
    assert not verify(out).ok  # no manifest yet: not a usable shard set

    result = convert(ConvertOptions(out=out, workers=2, **kw))
    assert (result.shards_kept, result.shards_written) == (1, 5)
    assert os.stat(os.path.join(out, "train-000000.tar")).st_mtime_ns == first.st_mtime_ns  # kept, not rewritten
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert _shard_digests(out) == _shard_digests(reference)
    assert load_manifest(out).to_dict() == load_manifest(reference).to_dict()
    assert verify(out).ok

    # A finished set re-run is a no-op; a damaged shard is rewritten.
    assert convert(ConvertOptions(out=out, **kw)).shards_written == 0
    with open(os.path.join(out, "train-000002.tar"), "r+b") as f:
        f.seek(700)
        f.write(b"\xff")
    assert convert(ConvertOptions(out=out, **kw)).shards_written == 1
    assert _shard_digests(out) == _shard_digests(reference)

    # Other options must not silently mix with the finished shards.
    with pytest.raises(ConvertError, match="samples_per_shard: 3 -> 4"):
        convert(ConvertOptions(out=out, **dict(kw, samples_per_shard=4)))
    result = convert(ConvertOptions(out=out, **dict(kw, samples_per_shard=4)), overwrite=True)
    assert len(result.manifest.shards) == 4 and sorted(_shard_digests(out)) == [shard_name("train", k) for k in range(4)]
    convert(ConvertOptions(out=out, **dict(kw, prefix="again")), overwrite=True)
    assert sorted(_shard_digests(out)) == [shard_name("again", k) for k in range(6)]


def test_output_identical_for_any_worker_count_with_reencode(synthetic_videos, tmp_path):
    kw = dict(format="kinetics", root=os.path.join(synthetic_videos, "videos"),
              annotations=os.path.join(synthetic_videos, "val.txt"), samples_per_shard=3, reencode=True,
              short_side=32, keyframe_interval=4, shuffle_seed=1)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    convert(_options(out=one, workers=1, **kw))
    convert(_options(out=two, workers=2, **kw))
    assert _shard_digests(one) == _shard_digests(two) and len(_shard_digests(one)) == 3
    assert load_manifest(one).to_dict() == load_manifest(two).to_dict()
    assert verify(two).ok
    for sample in _read_back(one):
        meta = SampleMeta.from_json(sample["json"])
        assert meta.reencoded and (meta.width, meta.height, meta.num_frames, meta.fps) == (32, 32, 32, 16.0)
        with av.open(io.BytesIO(sample["mp4"])) as c:
            keyframes = [p.is_keyframe for p in c.demux(video=0) if p.size]
        assert [i for i, k in enumerate(keyframes) if k] == list(range(0, 32, 4))


def test_plan_by_bytes_and_option_checks(tmp_path):
    root = tmp_path / "r"
    sizes = [300, 300, 300, 900, 100]
    for i, n in enumerate(sizes):
        _write(str(root / f"{i}.mp4"), b"x" * n)
    (tmp_path / "l.txt").write_text("".join(f"{i}.mp4 0\n" for i in range(len(sizes))))
    opts = _options(format="kinetics", root=str(root), annotations=str(tmp_path / "l.txt"), out=str(tmp_path / "o"),
                    max_shard_bytes=2 * (300 + 4096) + 10)
    shards, skipped = plan(opts, ann.parse_annotations("kinetics", str(root), str(tmp_path / "l.txt")))
    assert [[s.path for s in shard] for shard in shards] == [["0.mp4", "1.mp4"], ["2.mp4"], ["3.mp4"], ["4.mp4"]]
    assert [s.index for shard in shards for s in shard] == list(range(5)) and skipped == []
    with pytest.raises(ValueError, match="either"):
        _options(format="kinetics", root="r", annotations="a", out="o", samples_per_shard=2, max_shard_bytes=9)
    with pytest.raises(ValueError, match="--labels"):
        _options(format="ssv2", root="r", annotations="a", out="o")
    with pytest.raises(ValueError, match="annotation file"):
        _options(format="csv", root="r", out="o")
    # An output folder holding someone else's shards is not overwritten by accident.
    os.makedirs(tmp_path / "o")
    (tmp_path / "o" / "s-000000.tar").write_bytes(b"")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert(opts)


# --------------------------------------------------------------------------- verify


def test_verify_detects_tampering(synthetic_shards, tmp_path, capsys):
    out = str(tmp_path / "val")
    shutil.copytree(synthetic_shards["val"], out)
    assert cli_main(["verify", out]) == 0
    assert "OK" in capsys.readouterr().out

    shard = os.path.join(out, "val-000001.tar")
    original = open(shard, "rb").read()
    with open(shard, "r+b") as f:
        f.seek(1024)
        f.write(b"\x00" * 16)
    assert cli_main(["verify", out]) == 1
    assert "val-000001.tar: sha256" in capsys.readouterr().out

    # A shard rewritten with consistent checksums but a lying meta record: only decoding tells.
    manifest = load_manifest(out)
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(original)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                data = SampleMeta(**dict(json.loads(data), num_frames=31)).to_json()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    tampered = buf.getvalue()
    open(shard, "wb").write(tampered)
    manifest.shards[1] = dataclasses.replace(manifest.shards[1], sha256=hashlib.sha256(tampered).hexdigest(),
                                             num_bytes=len(tampered))
    save_manifest(out, manifest)
    report = verify(out)
    assert not report.ok and all("32 frames decode, meta says 31" in p for p in report.problems)
    assert len(report.problems) == 2 and verify(out, decode=False).ok

    # Counts and labels are checked against the manifest too; a missing shard is reported.
    open(shard, "wb").write(original)
    manifest.shards[1] = load_manifest(synthetic_shards["val"]).shards[1]
    manifest.shards[0] = dataclasses.replace(manifest.shards[0], class_counts={"0": 2})
    manifest.class_names = manifest.class_names[:1]
    save_manifest(out, manifest)
    os.unlink(os.path.join(out, "val-000003.tar"))
    problems = "\n".join(verify(out).problems)
    assert "val-000000.tar: class counts" in problems and "outside 0..0" in problems and "val-000003.tar: missing" in problems


# --------------------------------------------------------------------------- CLI


def test_cli_synth_with_shards_and_convert(tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert cli_main(["synth", "--out", out, "--num-classes", "3", "--videos-per-class", "4", "--val-videos-per-class", "2",
                     "--size", "32x32", "--frames", "8", "--samples-per-shard", "3", "--shards"]) == 0
    printed = capsys.readouterr().out
    assert "12 samples in 4 shards" in printed and "6 samples in 2 shards" in printed
    assert cli_main(["verify", f"{out}/shards/train", f"{out}/shards/val"]) == 0
    train = load_manifest(f"{out}/shards/train")
    assert train.class_names == list(SYNTH_CLASSES[:3]) and train.class_counts() == {0: 4, 1: 4, 2: 4}

    conv = str(tmp_path / "conv")
    args = ["convert", "--format", "folder", "--root", f"{out}/videos", "--out", conv, "--prefix", "all",
            "--samples-per-shard", "5"]
    assert cli_main(args) == 0
    assert "18 samples in 4 shards (4 written, 0 kept)" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "(0 written, 4 kept)" in capsys.readouterr().out
    assert cli_main(args[:-1] + ["6"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert", "--format", "ssv2", "--root", out, "--annotations", "x", "--out", conv,
                     "--prefix", "p"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["synth", "--out", out, "--size", "33x32"])


def test_synth_object_is_lighter_than_background():
    # One contrast polarity keeps motion direction linearly visible to a tubelet embedding.
    for i in range(20):
        rng = np.random.default_rng([7, i])
        clip = render_clip(i % len(SYNTH_CLASSES), rng, 64, 64, 8).astype(np.float32)
        background = clip[0, 0, 0]
        brightest = clip.reshape(-1, 3)[clip.reshape(-1, 3).sum(1).argmax()]
        assert (background <= synth_module._DARK_MAX + 1).all()
        assert (brightest >= synth_module._LIGHT_MIN - 1).all()
