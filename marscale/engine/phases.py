"""The phases of a training step, and the clock that times them for benchmarks.

`marscale.engine.step.TrainStep` marks the end of each phase; the trainer's step holds a
`NoClock` (marks nothing, syncs nothing), `marscale.engine.measure` a `PhaseClock`. No
DeepSpeed import here: `marscale.cost.compare` reads the phase names without it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

PHASES = ("masks", "data", "forward", "backward", "optimizer")
"""The phases of a step, in order: masks (describe the step, draw and pack the
micro-batch's mask, copy it), data (clip to the device, normalise, mixup, cast; the
trainer's clips arrive on the device, augmented there by its prefetcher with
data.augment_on "device"), forward (model and loss), backward, optimizer (DeepSpeed's
step: gradient reduction and clipping, AdamW, the gradient norm when asked for)."""


class PhaseClock:
    """Seconds spent in each phase (`PHASES`) of the steps run since the last `take()`,
    summed over micro-batches. Every mark synchronises the device first, so a phase's
    time is its own kernels' and not the next phase's: asked for by benchmarks only."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.seconds: dict[str, float] = {}
        self._last = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def start(self) -> None:
        self._last = self._now()

    def mark(self, phase: str) -> None:
        """`phase` ends now."""
        now = self._now()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        """The phases' seconds so far, in `PHASES` order; the clock starts afresh."""
        out = {p: self.seconds[p] for p in PHASES if p in self.seconds}
        self.seconds = {}
        return out


class NoClock:
    """The trainer's phase clock: marks nothing, syncs nothing."""

    def start(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass
