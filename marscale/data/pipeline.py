"""The sharded WebDataset video loaders: training (resampled, seeded) and evaluation (exact).

Training stages, run inside each DataLoader worker (`train_stages`)::

    resampled shards   each (rank, worker) draws its own endless shard stream, seeded by
                       (seed, epoch, rank, worker): this replaces split_by_node /
                       split_by_worker, so no rank can run out of shards or hang
    open               each shard (webdataset's gopen), closed when the next is read
    tar -> samples     tar_file_expander + group_by_keys; unreadable shards and members
                       are logged, counted and skipped (`SkipStats`)
    complete samples   keep samples with a video and an integer label (else count, skip)
    shuffle            sample-level buffer of `shuffle_buffer`, seeded likewise
    number, skip       the n-th sample of the worker's stream gets the random generator
                       (seed, epoch, rank, worker, n); samples before a resumed batch are
                       dropped here, before any decoding
    decode + augment   one frame sample decoded per video, `clips_per_video`
                       independent augmentations of it; bad videos counted and skipped
    batch              `batch_size` clips -> {"video": uint8 [B, C, T, H, W], "label": int64 [B]}
    take               this worker's share of the epoch

Epoch length, deterministic::

    samples_per_epoch  = cfg.samples_per_epoch or the number of videos in the manifest
    videos_per_batch   = batch_size // clips_per_video
    batches_per_rank   = samples_per_epoch // (world_size * videos_per_batch)   (steps_per_epoch)
    worker w of W      = batches k * W + w of the rank (DataLoader's round robin), i.e.
                         ceil((batches_per_rank - w) / W) batches

so every rank makes the same number of optimizer steps and an epoch decodes
batches_per_rank * world_size * videos_per_batch (<= samples_per_epoch) videos and makes
clips_per_video times as many clips. Shards are drawn with replacement, so an epoch is
a random sample of that size, not one exact pass over the set. The batch
stream is a function of (seed, epoch, rank, world_size, num_workers, the config): a run
resumed with the same values and `start_batch=b` yields exactly batches b, b+1, ... of
the uninterrupted epoch. On resume DataLoader worker i plays worker (i + b) mod W of the
original run, so the round robin still starts at batch b, and each worker skips its
earlier batches' samples before decoding them. (A video that fails to decode inside the
skipped prefix would shift the resumed stream by one sample; the converter checks that
every video decodes when it writes the shards.)

Evaluation (`eval_stages`): the manifest's shard list, split by rank then by worker
(shards[rank::world_size][worker::num_workers]), read in order once, every
(clip, crop) view of every video, batches of `eval_batch_size` views (the last batch of
each worker may be smaller). Each view is tagged with its video index (from the sample
key) and view number, so scores can be averaged per video after gathering. Ranks can
get different numbers of batches: run no collective per evaluation batch.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from marscale.data import sampling
from marscale.data.config import DataConfig
from marscale.data.decode import DecodeError, open_video, resolve_decoder
from marscale.data.transforms import EvalTransform, TrainTransform
from marscale.shards import LABEL_EXT, VIDEO_EXTENSIONS, key_to_index, load_manifest

log = logging.getLogger(__name__)

SKIP_REASONS = ("read", "incomplete", "label", "decode")
# After this many bad samples in a row a worker stops: the data is broken, not noisy.
MAX_CONSECUTIVE_SKIPS = 200
# Tags that keep the random streams of one worker independent of each other.
_SHARD_STREAM, _SHUFFLE_STREAM, _SAMPLE_STREAM = 0, 1, 2


class SkipStats:
    """Counts of skipped samples per reason, shared by the worker processes of a loader."""

    def __init__(self) -> None:
        # Shared memory created before the workers start, so they inherit it.
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))
        self._consecutive = 0  # per process: the workers each keep their own

    def skip(self, reason: str, key: str, detail: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += 1
        log.warning("skipping sample %s (%s): %s", key, reason, detail)
        self._consecutive += 1
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(
                f"{self._consecutive} bad samples in a row (last: {key}, {reason}: {detail}); "
                f"check the shards with `marscale-shards verify`"
            )

    def good(self) -> None:
        self._consecutive = 0

    def tar_error(self, exn: Exception) -> bool:
        """webdataset error handler: count, log and go on with the next member or shard."""
        self.skip("read", str(exn.args[-1]) if exn.args else "?", repr(exn))
        return True

    def as_dict(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(SKIP_REASONS, self._counts[:]))


def _seed_words(*parts: int) -> list[int]:
    return [int(p) for p in parts]


def _python_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(_seed_words(*parts)).generate_state(1, np.uint64)[0])


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def samples_per_epoch(cfg: DataConfig) -> int:
    return cfg.samples_per_epoch if cfg.samples_per_epoch is not None else load_manifest(cfg.train_shards).num_samples


def steps_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Batches per rank per epoch: samples_per_epoch // (world_size * videos_per_batch)."""
    n = samples_per_epoch(cfg) // (world_size * cfg.videos_per_batch)
    if n < 1:
        raise ValueError(
            f"an epoch of {samples_per_epoch(cfg)} videos is less than one batch of "
            f"{world_size} ranks x {cfg.videos_per_batch} videos; lower batch_size or raise samples_per_epoch"
        )
    return n


def worker_batches(batches_per_rank: int, num_workers: int, worker: int, start_batch: int) -> tuple[int, int]:
    """(first local batch, number of batches) of `worker` in an epoch resumed at `start_batch`.

    Worker w's local batch k is the rank's batch k * num_workers + w; it makes those
    in [start_batch, batches_per_rank).
    """
    first = max(0, -(-(start_batch - worker) // num_workers))
    end = max(0, -(-(batches_per_rank - worker) // num_workers))
    return first, max(0, end - first)


def num_classes(cfg: DataConfig) -> int:
    """Number of classes of the training shard set (from its manifest)."""
    return load_manifest(cfg.train_shards).num_classes


# --- stages -------------------------------------------------------------------------


def resampled_shards(urls: list[str], seed_words: list[int]) -> Callable[[], Iterator[dict]]:
    """An endless stream of {"url": shard} drawn with replacement, seeded by `seed_words`."""

    def stream() -> Iterator[dict]:
        rng = np.random.default_rng(seed_words)
        while True:
            yield {"url": urls[int(rng.integers(len(urls)))]}

    return stream


def shard_list(urls: list[str]) -> Callable[[], Iterator[dict]]:
    def stream() -> Iterator[dict]:
        for url in urls:
            yield {"url": url}

    return stream


def opened_shards(stats: SkipStats) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """{"url"} -> {"url", "stream"}, closing each shard once the next is asked for (or the
    stream is dropped) rather than leaving open files to the garbage collector."""

    def stage(shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            try:
                stream = gopen(shard["url"])
            except Exception as e:  # noqa: BLE001 - any opener failure is a bad shard, counted
                stats.skip("read", shard["url"], repr(e))
                continue
            try:
                yield {**shard, "stream": stream}
            finally:
                stream.close()

    return stage


def tar_samples(stats: SkipStats) -> list:
    """Tar members -> samples grouped by key; read errors are counted and skipped."""
    return [
        partial(tar_file_expander, handler=stats.tar_error),
        partial(group_by_keys, handler=stats.tar_error),
    ]


def complete_samples(stats: SkipStats) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Raw tar samples -> {"key", "video" (bytes), "label" (int)}; others counted and dropped."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            key = sample.get("__key__", "?")
            video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            if video_ext is None or LABEL_EXT not in sample:
                missing = [name for name, ok in (("video", video_ext), (LABEL_EXT, LABEL_EXT in sample)) if not ok]
                stats.skip("incomplete", key, f"no {' or '.join(missing)} member in {sample.get('__url__')}")
                continue
            try:
                label = int(sample[LABEL_EXT].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as e:
                stats.skip("label", key, f"label is not an integer: {e}")
                continue
            if label < 0:
                stats.skip("label", key, f"negative label {label}")
                continue
            yield {"key": key, "video": sample[video_ext], "label": label}

    return stage


def numbered_from(first: int) -> Callable[[Iterable[dict]], Iterator[tuple[int, dict]]]:
    """Number samples 0, 1, ... in stream order and drop those before `first` undecoded."""

    def stage(samples: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        for n, sample in enumerate(samples):
            if n >= first:
                yield n, sample

    return stage


def _decode(sample: dict, decoder: str, frame_indices: Callable[[int], list[np.ndarray]], stats: SkipStats):
    """Decode the frames `frame_indices(num_frames)` need: (distinct frames, per-clip positions)."""
    reader = None
    try:
        reader = open_video(sample["video"], decoder)
        clips = frame_indices(reader.num_frames)
        wanted, positions = np.unique(np.stack(clips), return_inverse=True)
        frames = reader.get_frames(wanted)
    except DecodeError as e:
        stats.skip("decode", sample["key"], str(e))
        return None
    finally:
        if reader is not None:
            reader.close()
    stats.good()
    return frames, positions.reshape(len(clips), -1)


def decode_train_clips(
    cfg: DataConfig, transform: TrainTransform, decoder: str, stats: SkipStats, seed_words: list[int]
) -> Callable[[Iterable[tuple[int, dict]]], Iterator[dict]]:
    """(n, sample) -> `clips_per_video` augmented clips {"video": uint8 [C, T, H, W], "label"}.

    Repeated augmentation as in VideoMAE/MAR: one frame sample is decoded per video and
    each clip is an independent spatial augmentation of those frames, so the decoding is
    paid once per video (separate temporal windows would cost nearly a decode each).
    """

    def stage(numbered: Iterable[tuple[int, dict]]) -> Iterator[dict]:
        for n, sample in numbered:
            rng = np.random.default_rng(seed_words + [n])

            def indices(num_video_frames: int) -> list[np.ndarray]:
                return [
                    sampling.train_indices(cfg.sampling, num_video_frames, cfg.num_frames, cfg.sampling_interval, rng)
                ]

            decoded = _decode(sample, decoder, indices, stats)
            if decoded is None:
                continue
            frames, positions = decoded
            clip = frames[positions[0]]  # [T, H, W, 3]
            for _ in range(cfg.clips_per_video):
                yield {"video": transform(clip, rng), "label": sample["label"]}

    return stage


def decode_eval_views(
    cfg: DataConfig, transform: EvalTransform, decoder: str, stats: SkipStats
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """sample -> its test_num_clips x test_num_crops views, tagged with video index and view."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:

            def indices(num_video_frames: int) -> list[np.ndarray]:
                return list(
                    sampling.eval_indices(
                        cfg.sampling, num_video_frames, cfg.num_frames, cfg.sampling_interval, cfg.test_num_clips
                    )
                )

            decoded = _decode(sample, decoder, indices, stats)
            if decoded is None:
                continue
            video_index = key_to_index(sample["key"])
            for view, clip in enumerate(transform(*decoded)):
                yield {"video": clip, "label": sample["label"], "video_index": video_index, "view": view}

    return stage


def batched(size: int, keep_partial: bool) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stack `size` items: "video" -> uint8 [B, C, T, H, W], every other field -> int64 [B]."""

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        out = {"video": torch.stack([item["video"] for item in items])}
        for name in items[0]:
            if name != "video":
                out[name] = torch.tensor([item[name] for item in items], dtype=torch.int64)
        return out

    def stage(items: Iterable[dict]) -> Iterator[dict]:
        batch: list[dict] = []
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield collate(batch)
                batch = []
        if batch and keep_partial:
            yield collate(batch)

    return stage


def take(count: int) -> Callable[[Iterable], Iterator]:
    def stage(items: Iterable) -> Iterator:
        if count <= 0:
            return
        for i, item in enumerate(items):
            yield item
            if i + 1 == count:
                return

    return stage


def train_stages(
    cfg: DataConfig,
    urls: list[str],
    *,
    epoch: int,
    rank: int,
    worker: int,
    first_sample: int,
    num_batches: int,
    transform: TrainTransform,
    decoder: str,
    stats: SkipStats,
) -> list:
    """The training pipeline of one (rank, worker) as an explicit list of stages."""
    base = (cfg.seed, epoch, rank, worker)
    shuffle_seed = _python_seed(*base, _SHUFFLE_STREAM)
    # Start yielding after 100 samples (not a full buffer) so the first batch comes quickly.
    shuffle = (
        [wds.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer), seed=shuffle_seed)]
        if cfg.shuffle_buffer > 1
        else []
    )
    return [
        resampled_shards(urls, _seed_words(*base, _SHARD_STREAM)),
        opened_shards(stats),
        *tar_samples(stats),
        complete_samples(stats),
        *shuffle,
        numbered_from(first_sample),
        decode_train_clips(cfg, transform, decoder, stats, _seed_words(*base, _SAMPLE_STREAM)),
        batched(cfg.batch_size, keep_partial=False),
        take(num_batches),
    ]


def eval_stages(
    cfg: DataConfig, urls: list[str], *, transform: EvalTransform, decoder: str, stats: SkipStats
) -> list:
    """The evaluation pipeline over `urls` (this reader's shards, in order) as a list of stages."""
    return [
        shard_list(urls),
        opened_shards(stats),
        *tar_samples(stats),
        complete_samples(stats),
        decode_eval_views(cfg, transform, decoder, stats),
        batched(cfg.eval_batch_size, keep_partial=True),
    ]


# --- datasets and loaders -----------------------------------------------------------


class TrainStream(IterableDataset):
    """One rank's training batches for one epoch; the pipeline is built in each worker.

    The transform is made here, in the parent: the forked workers inherit timm already
    imported instead of each importing it again.
    """

    def __init__(
        self, cfg: DataConfig, urls: list[str], *, epoch: int, rank: int, batches_per_rank: int, start_batch: int,
        decoder: str, stats: SkipStats,
    ):
        super().__init__()
        self.cfg, self.urls, self.epoch, self.rank = cfg, urls, epoch, rank
        self.batches_per_rank, self.start_batch = batches_per_rank, start_batch
        self.decoder, self.stats = decoder, stats
        self.transform = TrainTransform(cfg)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_slot()
        # Rotate roles so the DataLoader's round robin, which always starts at worker 0,
        # starts at batch `start_batch` (made by role start_batch mod W in the full epoch).
        role = (worker + self.start_batch) % num_workers
        first_batch, num_batches = worker_batches(self.batches_per_rank, num_workers, role, self.start_batch)
        stages = train_stages(
            self.cfg, self.urls, epoch=self.epoch, rank=self.rank, worker=role,
            first_sample=first_batch * self.cfg.videos_per_batch, num_batches=num_batches,
            transform=self.transform, decoder=self.decoder, stats=self.stats,
        )
        yield from wds.DataPipeline(*stages)


class EvalStream(IterableDataset):
    """One rank's evaluation views; shards are split between the workers at iteration."""

    def __init__(self, cfg: DataConfig, rank_urls: list[str], *, decoder: str, stats: SkipStats):
        super().__init__()
        self.cfg, self.rank_urls, self.decoder, self.stats = cfg, rank_urls, decoder, stats
        self.transform = EvalTransform(cfg)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_slot()
        stages = eval_stages(
            self.cfg, self.rank_urls[worker::num_workers], transform=self.transform, decoder=self.decoder,
            stats=self.stats,
        )
        yield from wds.DataPipeline(*stages)


def _dataloader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the workers batch
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # a fresh pipeline (and seed) per epoch
        prefetch_factor=2 if num_workers > 0 else None,
    )


class TrainLoader:
    """Iterable of {"video": uint8 [B, C, T, H, W], "label": int64 [B]} for one epoch.

    `len()` is the number of batches this iterator yields: steps_per_epoch - start_batch.
    """

    def __init__(self, loader: DataLoader, batches_per_epoch: int, start_batch: int, stats: SkipStats):
        self._loader = loader
        self.batches_per_epoch = batches_per_epoch
        self.start_batch = start_batch
        self.stats = stats

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self._loader)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by this loader's workers, per reason."""
        return self.stats.as_dict()


class EvalLoader:
    """Iterable of {"video", "label", "video_index", "view"} batches of this rank's views.

    `len()` is the expected number of batches (exact when no sample is skipped);
    `num_videos` the number of videos this rank reads, from the manifest.
    """

    def __init__(self, loader: DataLoader, num_batches: int, num_videos: int, stats: SkipStats):
        self._loader = loader
        self.num_batches = num_batches
        self.num_videos = num_videos
        self.stats = stats

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self._loader)

    def __len__(self) -> int:
        return self.num_batches

    def skipped(self) -> dict[str, int]:
        return self.stats.as_dict()


def build_train_loader(
    cfg: DataConfig, *, epoch: int, rank: int, world_size: int, start_batch: int = 0
) -> TrainLoader:
    """Training batches of `rank` for `epoch`, resumed at batch `start_batch` of the epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    manifest = load_manifest(cfg.train_shards)
    urls = manifest.shard_paths(cfg.train_shards)
    if not urls:
        raise ValueError(f"{cfg.train_shards}: the manifest lists no shards")
    batches = steps_per_epoch(cfg, world_size)
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {batches} batches")
    decoder = resolve_decoder(cfg.decoder)
    stats = SkipStats()
    stream = TrainStream(
        cfg, urls, epoch=epoch, rank=rank, batches_per_rank=batches, start_batch=start_batch,
        decoder=decoder, stats=stats,
    )
    return TrainLoader(_dataloader(stream, cfg.num_workers), batches, start_batch, stats)


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int) -> EvalLoader:
    """Every view of every evaluation video, each read once over all ranks and workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    manifest = load_manifest(cfg.val_shards)
    readers = world_size * max(1, cfg.num_workers)
    if len(manifest.shards) < readers:
        raise ValueError(
            f"{cfg.val_shards} has {len(manifest.shards)} shards but evaluation reads with {world_size} ranks x "
            f"{max(1, cfg.num_workers)} workers = {readers} readers, each of which needs a shard; "
            f"re-shard the evaluation set with smaller shards or lower num_workers"
        )
    # split_by_node then split_by_worker, with the rank given explicitly (not read from
    # the environment), so the engine and the tests can build any rank's loader.
    rank_shards = manifest.shards[rank::world_size]
    rank_urls = manifest.shard_paths(cfg.val_shards)[rank::world_size]
    workers = max(1, cfg.num_workers)
    num_batches = sum(
        math.ceil(sum(s.num_samples for s in rank_shards[w::workers]) * cfg.views_per_video / cfg.eval_batch_size)
        for w in range(workers)
    )
    stats = SkipStats()
    stream = EvalStream(cfg, rank_urls, decoder=resolve_decoder(cfg.decoder), stats=stats)
    num_videos = sum(s.num_samples for s in rank_shards)
    return EvalLoader(_dataloader(stream, cfg.num_workers), num_batches, num_videos, stats)
