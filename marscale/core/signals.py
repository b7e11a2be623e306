"""The stop signals of a training job: which they are, keeping them from loader workers,
and a flag that every rank agrees on at step boundaries.

A cluster pre-empts a job by signalling every process of it (SLURM, Kubernetes,
`kill` of a process group). Only the training process should react: it finishes the
step, saves and exits with a "try again" status. Loader workers are therefore started
with the signals blocked (`stop_signals_blocked`), and the trainer polls `StopSignal`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

import torch
import torch.distributed as torch_dist

from marscale.core import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals a training job stops on (checkpoint, then exit 75)."""


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while the body runs (processes forked inside
    inherit the blocked mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ignore(signum, frame) -> None:
    pass


class StopSignal:
    """SIGTERM / SIGUSR1 (or a stop file) -> a flag, agreed on by all ranks at step boundaries.

    The handler only sets the flag (nothing else is safe inside a signal handler); the
    loop calls `agreed()` once per step. The agreement is an all-reduce (MAX) over a
    gloo group of host tensors, so on GPUs it does not wait for the device's queue.
    Construct it on every rank (creating the gloo group is collective).
    """

    def __init__(self, stop_file: str | None = None) -> None:
        self.received: int | str | None = None
        self.stop_file = stop_file
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        self._group = None
        if dist.get_world_size() > 1:
            backend = torch_dist.get_backend()
            self._group = (
                None if backend == "gloo" else torch_dist.new_group(backend="gloo", timeout=dist.collective_timeout())
            )

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank received a signal, or `stop_file` exists (checked
        by the main rank: a stop asked for through shared storage, by a launch script or a
        person). Collective."""
        if self.received is None and self.stop_file and dist.is_main() and os.path.exists(self.stop_file):
            self.received = self.stop_file
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.get_world_size() > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        """Restore the previous handlers; after a stop signal, ignore further ones instead:
        the process is on its way out with status 75, and a repeated pre-emption signal
        (a scheduler's second notice, a launcher that reaches a rank twice) must not kill
        it with another status."""
        for s, handler in self._previous.items():
            # Not SIG_IGN: processes started later (a loader's workers) would inherit it.
            signal.signal(s, _ignore if self.received is not None else handler)
