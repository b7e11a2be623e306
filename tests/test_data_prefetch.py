"""The device prefetcher (marscale.data.prefetch): the batches a step gets through it are
the batches augmented when taken; it stays one batch ahead, never past its limit, and a
loader's error comes with the batch it concerns. With CUDA: the side stream's batches
equal the inline ones, and the step's stream waits for them (marked gpu).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marscale.core.clip import ClipConfig
from marscale.data import DataConfig
from marscale.data.augment_params import AugmentDraw
from marscale.data.device_augment import DeviceAugment
from marscale.data.prefetch import DevicePrefetcher
from marscale.data.stages import collate

CLIP = ClipConfig(img_size=32, num_frames=4)
CFG = DataConfig(train_shards="train", val_shards="val", random_erasing=0.5, rand_augment_before_crop=True)


def _loader_batches(count: int, batch: int = 3, seed: int = 0) -> list[dict]:
    """Device-placement loader batches: decoded windows of mixed sizes, their drawn
    parameters, labels and (as under a token budget) the clips' mask ratios."""
    rng = np.random.default_rng(seed)
    draw = AugmentDraw(CFG, CLIP)
    out = []
    for _ in range(count):
        items = []
        for i in range(batch):
            h, w = int(rng.integers(36, 49)), int(rng.integers(36, 57))
            frames = rng.integers(0, 256, (CLIP.num_frames, h, w, 3), dtype=np.uint8)
            items.append({"video": torch.from_numpy(frames), "label": i,
                          "augment": draw(h, w, rng).to_tensors(draw.num_layers, CLIP.img_size)})
        collated = collate(items)
        collated["ratios"] = torch.tensor([0.5] * batch, dtype=torch.float64)
        out.append(collated)
    return out


class CountingIterator:
    """The batches, counting how many were asked for; raises `error` after them if given."""

    def __init__(self, batches: list[dict], error: Exception | None = None):
        self.batches, self.error, self.taken, self.closed = list(batches), error, 0, False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.taken == len(self.batches):
            if self.error is not None:
                raise self.error
            raise StopIteration
        self.taken += 1
        return self.batches[self.taken - 1]

    def close(self) -> None:
        self.closed = True


def test_the_prefetcher_gives_the_batches_augmented_when_taken():
    augment = DeviceAugment(CFG, CLIP)
    batches = _loader_batches(4)
    inline = [augment(b["video"], b["augment"]) for b in batches]
    got = list(DevicePrefetcher(iter(batches), torch.device("cpu"), augment))
    assert len(got) == 4
    for batch, want, source in zip(got, inline, batches):
        assert set(batch) == {"video", "label", "ratios"}  # the parameters are consumed
        assert batch["video"].shape == (3, 3, CLIP.num_frames, 32, 32)
        torch.testing.assert_close(batch["video"], want, rtol=0, atol=0)
        torch.testing.assert_close(batch["label"], source["label"], rtol=0, atol=0)
        assert batch["ratios"] is source["ratios"]  # read on the host by the step: left there
    # Worker-placement batches (already augmented) go through unchanged.
    clips = [{"video": v, "label": b["label"]} for v, b in zip(inline, batches)]
    for batch, want in zip(DevicePrefetcher(iter(clips), torch.device("cpu")), inline):
        torch.testing.assert_close(batch["video"], want, rtol=0, atol=0)


def test_it_stays_one_batch_ahead_and_never_past_its_limit():
    source = CountingIterator(_loader_batches(5))
    prefetcher = DevicePrefetcher(source, torch.device("cpu"), DeviceAugment(CFG, CLIP), limit=3)
    assert source.taken == 0  # nothing is drawn before the first batch is asked for
    next(prefetcher)
    assert source.taken == 2  # the next one is prepared while the first one's step runs
    next(prefetcher)
    next(prefetcher)
    assert source.taken == 3  # the limit: the run trains on no more
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()
    assert source.closed


def test_a_loader_error_is_raised_with_the_batch_it_failed_to_make():
    source = CountingIterator(_loader_batches(2), error=RuntimeError("the training loader ended after 2 of 4"))
    prefetcher = DevicePrefetcher(source, torch.device("cpu"), DeviceAugment(CFG, CLIP))
    next(prefetcher)
    next(prefetcher)  # the error came while this one was handed over: it waits for its own batch
    with pytest.raises(RuntimeError, match="ended after 2 of 4"):
        next(prefetcher)
    with pytest.raises(StopIteration):
        next(prefetcher)


class _SlowAugment(DeviceAugment):
    """Holds the stream it runs on for `cycles` GPU cycles before each batch's kernels."""

    def __init__(self, cycles: int):
        super().__init__(CFG, CLIP)
        self.cycles = cycles

    def apply(self, video, plan):
        torch.cuda._sleep(self.cycles)
        return super().apply(video, plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side_cycles, step_cycles", [(50_000_000, 0), (0, 100_000_000)])
def test_cuda_side_stream_batches_equal_inline_ones_and_the_step_waits_for_them(side_cycles, step_cycles):
    """A slow side stream: a step that did not wait for it (`wait_stream`) would read clips
    not yet written. A slow step: without `record_stream` the allocator would give a taken
    batch's memory to the next batch, written on the side stream while the step still
    reads it."""
    device = torch.device("cuda")
    augment = DeviceAugment(CFG, CLIP)
    batches = _loader_batches(6, batch=4, seed=1)
    for b in batches:
        b["video"], b["label"] = b["video"].pin_memory(), b["label"].pin_memory()  # as the DataLoader gives them
    inline = [augment(b["video"].to(device), b["augment"]) for b in batches]
    torch.cuda.synchronize()
    prefetcher = DevicePrefetcher(iter(batches), device, _SlowAugment(side_cycles))
    assert prefetcher.stream is not None and prefetcher.stream != torch.cuda.current_stream()
    seen = []
    for batch in prefetcher:
        assert batch["video"].device.type == "cuda" and batch["ratios"].device.type == "cpu"
        torch.cuda._sleep(step_cycles)  # the step's work, on its stream
        seen.append(batch["video"].clone())
        del batch  # its memory goes back to the allocator while the step may still read it
    torch.cuda.synchronize()
    assert len(seen) == len(inline)
    for got, want in zip(seen, inline):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
