"""Training batches on the device, one batch ahead: the next batch's copy and device
augmentation overlap the current step.

`DevicePrefetcher` wraps the loader's batch iterator. When the loop takes batch i, the
prefetcher has already queued batch i+1: its clips copied to the device (from the
loader's pinned memory, non-blocking) and, with ``data.augment_on: device``, augmented
there by `DeviceAugment` (whose parameters cross in one pinned, non-blocking copy per
batch). What the loop gets is the batch as the step takes it::

    {"video": uint8 [B, C, T, S, S] on the device, "label": int64 [B] on the device,
     any other field as the loader gave it (e.g. "ratios", read on the host)}

CUDA: the copies and the augmentation are queued on a side stream, so they run while
step i's kernels run on the consumer's stream (the current stream when a batch is
taken). Before a batch is handed over, the consumer's stream waits for the side stream
(`wait_stream`: no host sync), and every tensor made on the side stream and handed over
is marked as used by the consumer's stream (`record_stream`), so the caching allocator
gives its memory to no later batch until the step's kernels that read it are done. The
host memory of a copy stays reserved until the copy has run (PyTorch's pinned-memory
allocator records the copy's stream).

Other devices (CPU): no stream; the same preparation runs inline, a batch ahead, and
gives the same batches (tested against augmenting each batch when it is taken).

The prefetcher draws no random number (the loader drew every augmentation parameter),
so a run's random streams, and its resume, are those of a run without it. It asks the
loader for at most `limit` batches, so it opens no epoch the run will not train on. An
error from the loader is raised when the batch it failed to make is taken, not a step
early.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from marscale.data.device_augment import DeviceAugment

_MOVED = ("video", "label", "augment")
"""Fields the prefetcher replaces: the clips and labels (on the device) and the device
augmentation's parameters (consumed)."""


class DevicePrefetcher:
    """Iterator of the loader's batches, placed (and augmented) on `device` one batch ahead.

    batches: the loader's batches (host tensors: "video" uint8 [B, C, T, S, S], or decoded
    windows uint8 [B, T, H, W, 3] with their "augment" parameters when `augment` is given).
    limit: the most batches to draw from `batches` (None: until they end).
    """

    def __init__(
        self, batches: Iterator[dict], device: torch.device, augment: DeviceAugment | None = None,
        limit: int | None = None,
    ):
        self.batches, self.device, self.augment = batches, device, augment
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.remaining = limit
        self._next: dict | Exception | None = None
        self._started = False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict:
        if not self._started:
            self._started = True
            self._next = self._fetch()
        batch = self._next
        if batch is None:
            raise StopIteration
        if isinstance(batch, Exception):
            self._next = None
            raise batch
        if self.stream is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self.stream)  # the batch's copies and kernels come first
            for name in ("video", "label"):
                batch[name].record_stream(consumer)
        # Queued now, behind the batch just handed over: runs while the caller's step does.
        self._next = self._fetch()
        return batch

    def _fetch(self) -> dict | Exception | None:
        """The next batch prepared, the loader's error, or None at the end."""
        if self.remaining == 0:
            return None
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        except Exception as error:  # noqa: BLE001 - raised again when this batch is taken
            return error
        if self.remaining is not None:
            self.remaining -= 1
        try:
            return self.prepare(batch)
        except Exception as error:  # noqa: BLE001 - likewise
            return error

    def prepare(self, batch: dict) -> dict:
        """One loader batch on the device (augmented when the prefetcher has `augment`),
        queued on the side stream on CUDA."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            video = batch["video"].to(self.device, non_blocking=True)
            if self.augment is not None:
                video = self.augment(video, batch["augment"])  # decoded windows -> clips
            labels = batch["label"].to(self.device, non_blocking=True)
        return {**{k: v for k, v in batch.items() if k not in _MOVED}, "video": video, "label": labels}

    def close(self) -> None:
        """Drop the batch prepared ahead and close the loader's iterator (its workers)."""
        self._next = None
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
