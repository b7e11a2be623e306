"""Decoder backends (marscale.data.decode): same frames for the same indices, clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from marscale.data.decode import DecodeError, available_decoders, open_video, resolve_decoder
from shards_tools.synth import encode_video, render_clip

BACKENDS = available_decoders()


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, bytes]:
    frames = render_clip(0, np.random.default_rng(0), 64, 48, 40)
    return frames, encode_video(frames, 16.0, gop=8)


def test_decord_and_pyav_are_available():
    # Both are install requirements of the package.
    assert {"decord", "pyav"} <= set(BACKENDS)
    assert resolve_decoder("auto") == "pyav"  # the cheapest per clip (docs/benchmarks.md)
    assert resolve_decoder("pyav") == "pyav"
    with pytest.raises(ValueError, match="unknown decoder"):
        resolve_decoder("opencv")


@pytest.mark.skipif(importlib.util.find_spec("torchcodec") is not None, reason="torchcodec is installed")
def test_missing_backend_is_reported():
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_decoder("torchcodec")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_match_the_source_within_codec_error(backend, clip):
    frames, data = clip
    reader = open_video(data, backend)
    try:
        assert reader.num_frames == 40 and reader.fps == pytest.approx(16.0)
        idx = np.array([33, 2, 2, 17, 39, 0, 9])  # unsorted, repeated, across keyframes
        out = reader.get_frames(idx)
    finally:
        reader.close()
    assert out.dtype == np.uint8 and out.shape == (7, 48, 64, 3)
    error = np.abs(out.astype(int) - frames[idx].astype(int)).mean(axis=(1, 2, 3))
    assert error.max() < 6.0, error  # H.264 at crf 18 + yuv420
    # Each decoded frame is nearest to its own source frame: no off-by-one after seeking.
    distance = np.abs(out[:, None].astype(int) - frames[None].astype(int)).mean(axis=(2, 3, 4))  # [7, 40]
    np.testing.assert_array_equal(distance.argmin(axis=1), idx)


def test_backends_agree(clip):
    _, data = clip
    idx = np.arange(3, 40, 5)
    outs = {}
    for backend in BACKENDS:
        reader = open_video(data, backend)
        outs[backend] = reader.get_frames(idx).astype(int)
        reader.close()
    first = outs[BACKENDS[0]]
    for backend, out in outs.items():
        assert np.abs(out - first).mean() < 1.0, backend  # same decoder library; colour conversion may differ


@pytest.mark.parametrize("backend", BACKENDS)
def test_webm_without_frame_count(backend):
    frames = render_clip(0, np.random.default_rng(1), 32, 32, 24)
    data = encode_video(frames, 12.0, codec="libvpx-vp9", fmt="webm")
    reader = open_video(data, backend)
    try:
        assert abs(reader.num_frames - 24) <= 1
        out = reader.get_frames(np.array([0, 10, 20]))
    finally:
        reader.close()
    assert np.abs(out.astype(int) - frames[[0, 10, 20]].astype(int)).mean() < 8.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [b"", b"not a video at all" * 50, "truncated"])
def test_corrupt_bytes_raise_decode_error(backend, bad, clip):
    data = clip[1][: len(clip[1]) // 2] if bad == "truncated" else bad
    with pytest.raises(DecodeError):
        reader = open_video(data, backend)
        reader.get_frames(np.array([0, reader.num_frames - 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index(backend, clip):
    reader = open_video(clip[1], backend)
    with pytest.raises(IndexError):
        reader.get_frames(np.array([40]))
    reader.close()
