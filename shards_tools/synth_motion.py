"""The `motion` synthetic task: which way do most objects drift, among distractors?

A harder companion to the demo's set (`synth.render_clip`), made so that a small
full-token ViT trained from scratch on a CPU neither stays at chance nor saturates, and
so that only time tells the classes apart. Each clip shows, over a static textured
background with pixel noise:

- `NUM_SIGNAL` objects that drift in the class's direction (one of 8 compass
  directions, 45 degrees apart), each at its own speed;
- `NUM_DISTRACTORS` objects of the same look that drift in other directions (at least
  `_DISTRACTOR_MIN_OFFSET` away from the class's), each at its own speed;
- objects of varied size, shape (disc or square) and light colour on a dark background.

The frame is a torus: an object leaving one edge comes back at the other. Every object's
position at the clip's middle instant is uniform over the frame, so its position in any
frame is uniform too, whatever the class: a single frame carries no information about the
class. Two exact properties the tests check:
- with an odd number of frames the middle frame does not depend on the class (the draws
  are the same for every class; only velocities depend on it);
- without pixel noise, a clip played backwards is the clip of the opposite direction
  (`TIME_REVERSED`) from the same draws.
"""

from __future__ import annotations

import math

import numpy as np

MOTION_CLASSES = (
    "drift_right",
    "drift_down_right",
    "drift_down",
    "drift_down_left",
    "drift_left",
    "drift_up_left",
    "drift_up",
    "drift_up_right",
)
# Class k drifts at angle k x 45 degrees in image coordinates (y down): backwards, k + 4.
MOTION_TIME_REVERSED = {k: (k + 4) % len(MOTION_CLASSES) for k in range(len(MOTION_CLASSES))}

NUM_SIGNAL = 3
NUM_DISTRACTORS = 1
DEFAULT_NOISE = 8.0

# Distractors drift at least this far (radians) from the class direction, so the class
# stays the direction most objects share.
_DISTRACTOR_MIN_OFFSET = math.pi / 3
# Sizes and speeds for a 64-pixel short side; scaled with the frame.
_RADIUS = (5.0, 10.0)
_SPEED = (1.5, 3.0)  # pixels per frame
_BACKGROUND_BASE = (15.0, 60.0)
_TEXTURE_AMPLITUDE = 12.0
_OBJECT_COLOUR = (150.0, 255.0)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A static dark texture: a random base colour plus three sinusoidal gratings, float [H, W, 3].

    The gratings complete whole cycles across the frame, so the texture is seamless on the
    torus the objects move on.
    """
    base = rng.uniform(*_BACKGROUND_BASE, size=3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    texture = np.zeros((height, width, 3))
    for _ in range(3):
        fx, fy = rng.integers(-4, 5, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        tint = rng.uniform(0.3, 1.0, size=3)
        grating = np.sin(2 * math.pi * (fx * xs / width + fy * ys / height) + phase)
        texture += grating[..., None] * tint
    return base + _TEXTURE_AMPLITUDE / 3 * texture


def render_motion_clip(
    label: int,
    rng: np.random.Generator,
    width: int,
    height: int,
    num_frames: int,
    noise: float = DEFAULT_NOISE,
) -> np.ndarray:
    """Render one clip of class `label` (a drift direction): uint8 [T, H, W, 3].

    Every random draw happens in the same order and number for every class; the class only
    turns the velocities. `noise` is the std (0-255 units) of Gaussian pixel noise per frame.
    """
    if not 0 <= label < len(MOTION_CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(MOTION_CLASSES) - 1}")
    scale = min(width, height) / 64.0
    background = _background(rng, width, height)
    heading = label * 2 * math.pi / len(MOTION_CLASSES)
    count = NUM_SIGNAL + NUM_DISTRACTORS
    centre = rng.uniform(0, 1, size=(count, 2)) * (width, height)  # position at the middle instant
    radius = rng.uniform(*_RADIUS, size=count) * scale
    square = rng.random(count) < 0.5
    colour = rng.uniform(*_OBJECT_COLOUR, size=(count, 3))
    speed = rng.uniform(*_SPEED, size=count) * scale
    offset = np.zeros(count)
    offset[NUM_SIGNAL:] = rng.uniform(_DISTRACTOR_MIN_OFFSET, 2 * math.pi - _DISTRACTOR_MIN_OFFSET,
                                      size=NUM_DISTRACTORS)
    angle = heading + offset
    velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # [count, (x, y)]

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    middle = (num_frames - 1) / 2
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = background.copy()
        positions = centre + velocity * (t - middle)
        for (cx, cy), r, sq, c in zip(positions, radius, square, colour):
            # Offsets on the torus: the nearest copy of the object in each direction.
            dx = (xs - cx + width / 2) % width - width / 2
            dy = (ys - cy + height / 2) % height - height / 2
            extent = np.maximum(np.abs(dx), np.abs(dy)) if sq else np.hypot(dx, dy)
            # A one-pixel ramp at the edge keeps sub-pixel motion visible after H.264.
            alpha = np.clip(r - extent + 0.5, 0.0, 1.0)[..., None]
            frame += alpha * (c - frame)
        if noise > 0:
            frame += rng.normal(0.0, noise, size=frame.shape)
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames
