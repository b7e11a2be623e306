"""A synthetic labelled action dataset whose classes differ only in temporal order.

Every clip shows one rotated rectangle on a plain background. Colours, size, aspect,
orientation and position are drawn at random per clip. Classes come in time-reversed
pairs (move_right/move_left, move_down/move_up, grow/shrink, rotate_cw/rotate_ccw) whose
single frames follow the same distribution: only the order of the frames says which of
the two a clip is, and `move_right` played backwards *is* a `move_left` clip. That makes the set a small, honest test of a video model: an
image model cannot beat chance on it, a tiny video ViT learns it in minutes on a CPU.

Clips are rendered with numpy and encoded with PyAV (H.264 in MP4 by default). Output
is a function of (seed, split, class, index) only, so the same call writes the same
bytes for any number of worker processes.

    make_synthetic_dataset("/tmp/synth", num_classes=4, videos_per_class=50)

writes ``videos/<class>/<split>_<i>.mp4``, Kinetics-style lists ``train.txt`` /
``val.txt`` (``class/file.mp4 label``, relative to ``videos/``) and ``classes.txt``.

`task` picks the task family (`TASKS`): "actions" is the set above (the demo's, the
default); "motion" (`synth_motion`) is a harder one for experiments that must not
saturate: 8 drift directions of several objects among distractors, on a textured, noisy
background.
"""

from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import os
from fractions import Fraction
from typing import Any, Callable, Sequence

import av
import numpy as np

from .synth_motion import DEFAULT_NOISE as MOTION_NOISE
from .synth_motion import MOTION_CLASSES, MOTION_TIME_REVERSED, render_motion_clip
from .video import x264_options

SYNTH_CLASSES = (
    "move_right",
    "move_left",
    "move_down",
    "move_up",
    "grow",
    "shrink",
    "rotate_cw",
    "rotate_ccw",
)

# Each class and the class it turns into when played backwards.
TIME_REVERSED = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4, 6: 7, 7: 6}

VIDEO_DIR = "videos"
CLASSES_FILE = "classes.txt"

# Colour distance (RGB, 0-255) the object keeps from the background, so it is always seen.
_MIN_CONTRAST = 110.0
# Background channels stay below _DARK_MAX, object channels above _LIGHT_MIN.
_DARK_MAX = 110.0
_LIGHT_MIN = 150.0


def _random_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, object) RGB colours: random, with the object always the lighter one.

    One contrast polarity is deliberate. A tubelet embedding is linear, so with a light
    object on a dark background its response to motion has one sign and a small ViT
    trained from scratch separates the directions within a few hundred steps. With both
    polarities the directions cancel in any linear feature; telling them apart needs a
    contrast-invariant motion detector, and a from-scratch ViT then stays at chance for
    thousands of steps (a small 3-D CNN learns either variant).
    """
    background = rng.uniform(0, _DARK_MAX, size=3)
    while True:
        colour = rng.uniform(_LIGHT_MIN, 255, size=3)
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            return background, colour


def _trajectory(label: int, rng: np.random.Generator, width: int, height: int, num_frames: int):
    """Per-frame (cx, cy, length, thickness, angle) of the rectangle, each shape [T].

    The still-frame distribution (where the object is, how big, which way it points) is
    the same for a class and its time-reversed partner; only the direction of change
    differs. Motion spans a large part of the frame so it is visible at 64x64.
    """
    short = min(width, height)
    t = np.linspace(0.0, 1.0, num_frames)
    aspect = rng.uniform(1.8, 3.0)
    length = np.full(num_frames, rng.uniform(0.28, 0.4) * short)
    angle = np.full(num_frames, rng.uniform(0.0, math.pi))
    # Keep the centre where a rectangle of this length stays mostly inside the frame.
    margin = 0.5 * length[0] * 0.75

    def centre_range(extent: float) -> tuple[float, float]:
        return margin, extent - margin

    lo_x, hi_x = centre_range(width)
    lo_y, hi_y = centre_range(height)
    cx = np.full(num_frames, rng.uniform(lo_x, hi_x))
    cy = np.full(num_frames, rng.uniform(lo_y, hi_y))

    if label in (0, 1, 2, 3):
        horizontal = label in (0, 1)
        lo, hi = (lo_x, hi_x) if horizontal else (lo_y, hi_y)
        travel = rng.uniform(0.55, 0.85) * (hi - lo)
        start = rng.uniform(lo, hi - travel)
        path = start + travel * t
        if label in (1, 3):  # left / up: the same path walked backwards
            path = path[::-1]
        if horizontal:
            cx = path
        else:
            cy = path
    elif label in (4, 5):
        small = rng.uniform(0.12, 0.18) * short
        large = rng.uniform(0.5, 0.65) * short
        scale = small + (large - small) * t
        length = scale if label == 4 else scale[::-1]
        margin_end = 0.5 * large * 0.5
        cx = np.full(num_frames, rng.uniform(margin_end, width - margin_end))
        cy = np.full(num_frames, rng.uniform(margin_end, height - margin_end))
    elif label in (6, 7):
        # At most ~6 degrees a frame: with 2x temporal subsampling the step is still
        # far below the 90 degrees at which a (180-degree symmetric) bar becomes ambiguous.
        sweep = rng.uniform(0.55, 1.0) * math.pi
        # Image y points down, so a growing angle turns clockwise on screen.
        sign = 1.0 if label == 6 else -1.0
        angle = angle[0] + sign * sweep * t
    else:
        raise ValueError(f"label {label} out of range: the synthetic set has {len(SYNTH_CLASSES)} classes")
    thickness = length / aspect
    return cx, cy, length, thickness, angle


def render_clip(
    label: int,
    rng: np.random.Generator,
    width: int,
    height: int,
    num_frames: int,
    noise: float = 0.0,
) -> np.ndarray:
    """Render one clip of class `label`: uint8 [T, H, W, 3].

    `noise` is the std (in 0-255 units) of Gaussian pixel noise added to every frame.
    """
    if not 0 <= label < len(SYNTH_CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(SYNTH_CLASSES) - 1}")
    background, colour = _random_colours(rng)
    cx, cy, length, thickness, angle = _trajectory(label, rng, width, height, num_frames)
    fill = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frame = np.broadcast_to(background, (height, width, 3)).copy() if noise > 0 else None
        # Only the object's bounding box needs the geometry: the rest is background.
        r = 0.5 * math.hypot(length[i], thickness[i]) + 1.0
        x0, x1 = max(0, int(cx[i] - r)), min(width, int(math.ceil(cx[i] + r)))
        y0, y1 = max(0, int(cy[i] - r)), min(height, int(math.ceil(cy[i] + r)))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        c, s = math.cos(angle[i]), math.sin(angle[i])
        dx, dy = xs - cx[i], ys - cy[i]
        u = np.abs(dx * c + dy * s)  # distance along the long axis
        v = np.abs(-dx * s + dy * c)
        # Signed distance to the edge, clipped to a one-pixel ramp: an anti-aliased edge
        # keeps sub-pixel motion visible after H.264 compression.
        alpha = np.clip(np.minimum(length[i] / 2 - u, thickness[i] / 2 - v) + 0.5, 0.0, 1.0)
        patch = background + alpha[..., None] * (colour - background)
        if frame is None:
            frames[i] = fill
            frames[i, y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
        else:
            frame[y0:y1, x0:x1] = patch
            frame += rng.normal(0.0, noise, size=frame.shape)
            frames[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


@dataclasses.dataclass(frozen=True)
class SynthTask:
    """One family of synthetic classes: their names, how to render a clip, defaults."""

    classes: tuple[str, ...]
    time_reversed: dict[int, int]
    render: Callable[..., np.ndarray]  # (label, rng, width, height, num_frames, noise=) -> uint8 [T, H, W, 3]
    default_noise: float
    default_num_classes: int


TASKS: dict[str, SynthTask] = {
    "actions": SynthTask(SYNTH_CLASSES, TIME_REVERSED, render_clip, default_noise=0.0, default_num_classes=4),
    "motion": SynthTask(MOTION_CLASSES, MOTION_TIME_REVERSED, render_motion_clip, default_noise=MOTION_NOISE,
                        default_num_classes=len(MOTION_CLASSES)),
}


def encode_video(
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    gop: int | None = None,
    fmt: str = "mp4",
    crf: int | None = None,
) -> bytes:
    """Encode uint8 [T, H, W, 3] RGB frames to a yuv420p video file in memory.

    `gop` is the keyframe interval (the codec default when None). Encoding is
    single-threaded so the bytes are reproducible; run several encoders in parallel
    instead.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs an even width and height, got {width}x{height}")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format=fmt) as container:
        if codec == "libx264":
            options = x264_options(18 if crf is None else crf)
        else:
            # One encoder thread here too, passed to the encoder itself (see x264_options).
            options = {"threads": "1"}
            if codec.startswith("libvpx"):
                options.update({"deadline": "realtime", "cpu-used": "8", "crf": str(10 if crf is None else crf), "b": "0"})
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _clip_seed(seed: int, split_index: int, label: int, index: int) -> list[int]:
    return [seed, split_index, label, index]


def _render_and_write(job: tuple[str, int, list[int], dict[str, Any]]) -> str:
    path, label, seed_words, opts = job
    rng = np.random.default_rng(seed_words)
    render = TASKS[opts["task"]].render
    frames = render(label, rng, opts["width"], opts["height"], opts["num_frames"], noise=opts["noise"])
    data = encode_video(frames, opts["fps"], codec=opts["codec"], gop=opts["gop"], fmt=opts["fmt"])
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def make_synthetic_dataset(
    root: str,
    num_classes: int | None = None,
    videos_per_class: int = 20,
    width: int = 64,
    height: int = 64,
    num_frames: int = 32,
    fps: float = 16.0,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    workers: int = 1,
    val_videos_per_class: int | None = None,
    noise: float | None = None,
    codec: str = "libx264",
    gop: int | None = None,
    progress: bool | None = False,
    task: str = "actions",
) -> dict[str, Any]:
    """Write a folder-per-class synthetic dataset with Kinetics-style lists.

    Split "train" gets `videos_per_class` clips per class, every other split gets
    `val_videos_per_class` (default: a quarter of `videos_per_class`, at least 1).
    `task` names a family in `TASKS`; `num_classes` (the first K of its classes) and
    `noise` default to the task's (actions: 4 classes, no noise).
    Returns ``{"root", "video_root", "classes", "lists": {split: list path},
    "num_videos": {split: n}}``. progress: tqdm bar (None: only on a terminal).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    num_classes = spec.default_num_classes if num_classes is None else num_classes
    noise = spec.default_noise if noise is None else noise
    if not 1 <= num_classes <= len(spec.classes):
        raise ValueError(f"num_classes must be in 1..{len(spec.classes)} for task {task!r}, got {num_classes}")
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class must be >= 1, got {videos_per_class}")
    if val_videos_per_class is None:
        val_videos_per_class = max(1, videos_per_class // 4)
    classes = list(spec.classes[:num_classes])
    ext = "webm" if codec.startswith("libvpx") else "mp4"
    fmt = "webm" if ext == "webm" else "mp4"
    opts = dict(width=width, height=height, num_frames=num_frames, fps=fps, noise=noise, codec=codec, gop=gop, fmt=fmt,
                task=task)

    video_root = os.path.join(root, VIDEO_DIR)
    for name in classes:
        os.makedirs(os.path.join(video_root, name), exist_ok=True)
    jobs: list[tuple[str, int, list[int], dict[str, Any]]] = []
    lists: dict[str, list[str]] = {}
    for split_index, split in enumerate(splits):
        count = videos_per_class if split == "train" else val_videos_per_class
        lines = []
        for label, name in enumerate(classes):
            for i in range(count):
                rel = f"{name}/{split}_{i:05d}.{ext}"
                lines.append(f"{rel} {label}")
                jobs.append((os.path.join(video_root, rel), label, _clip_seed(seed, split_index, label, i), opts))
        lists[split] = lines

    if workers > 1:
        # spawn, not fork: the caller may hold threads (PyAV, torch) that fork would copy
        # in a locked state.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            _consume(pool.imap_unordered(_render_and_write, jobs, chunksize=4), len(jobs), progress)
    else:
        _consume(map(_render_and_write, jobs), len(jobs), progress)

    list_paths = {}
    for split, lines in lists.items():
        list_paths[split] = os.path.join(root, f"{split}.txt")
        with open(list_paths[split], "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, CLASSES_FILE), "w") as f:
        f.write("\n".join(classes) + "\n")
    return {
        "root": root,
        "video_root": video_root,
        "classes": classes,
        "lists": list_paths,
        "num_videos": {split: len(lines) for split, lines in lists.items()},
    }


def _consume(results, total: int, progress: bool | None) -> None:
    from tqdm import tqdm

    for _ in tqdm(results, total=total, desc="render", unit="video", disable=None if progress is None else not progress):
        pass
