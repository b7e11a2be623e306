"""The training and evaluation loaders: one rank's batches, built from a shard set.

Training: `TrainStream` builds the stages of `stages.train_stages` inside each DataLoader
worker. Epoch length is decided by the run plan (`marscale.engine.plan`) and passed in
as `batches_per_epoch`, loader batches per rank; worker w of W makes batches
k * W + w of the rank (DataLoader's round robin), i.e. ceil((batches_per_epoch - w) / W)
of them, so every rank makes the same number of steps. Shards are drawn with
replacement, so an epoch is a random sample of that size, not one exact pass over the set.

The batch stream is a function of (seed, epoch, rank, world_size, num_workers, the
config): a loader resumed with `start_batch=b` yields exactly batches b, b+1, ... of the
uninterrupted epoch. On resume DataLoader worker i plays worker (i + b) mod W of the
original run, so the round robin still starts at batch b, and each worker skips its
earlier batches' samples before decoding them. (A video that fails to decode inside the
skipped prefix would shift the resumed stream by one sample; the converter checks that
every video decodes when it writes the shards.)

Evaluation: the shard list split by rank then by worker
(shards[rank::world_size][worker::num_workers]), read in order once. Ranks can get
different numbers of batches: run no collective per evaluation batch.

Bad samples, both splits: `num_classes` is the model's (the run plan's). A label outside
[0, num_classes), a missing member, an undecodable video and, in evaluation, a key that is
not a sample index are logged with the shard and key, counted per reason (`skipped()`)
and skipped. Training skips them so one bad sample cannot end a run. Evaluation skips
them too rather than failing, because a reader that raised on one rank would leave the
others waiting in the score all-reduce; the result reports the videos scored against
the manifest's, and the pre-flight (`marscale.engine.preflight`) has already refused
shard sets whose manifests list more classes than the model has.

Both loops iterate through `start_iterator`, whose `LoaderIterator` stops the worker
processes on every way out (they ignore SIGTERM; see there) and reports a worker's
"bad samples in a row" in one line. Each loader counts its skipped samples per reason
(`skipped()`, shared memory the workers write to).
"""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing.util  # noqa: F401 - registers its exit handler before ours (see start_iterator)
import weakref
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from marscale.core.clip import ClipConfig
from marscale.data.config import DataConfig
from marscale.data.decode import resolve_decoder
from marscale.data.augment_params import AugmentDraw
from marscale.data.stages import ShardDataError, SkipStats, augmented_clip, clip_for_device, eval_stages, train_stages
from marscale.data.transforms import EvalTransform, TrainTransform
from marscale.data.shards import ShardSet
from marscale.core.signals import stop_signals_blocked


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_batches(batches_per_rank: int, num_workers: int, worker: int, start_batch: int) -> tuple[int, int]:
    """(first local batch, number of batches) of `worker` in an epoch resumed at `start_batch`.

    Worker w's local batch k is the rank's batch k * num_workers + w; it makes those
    in [start_batch, batches_per_rank).
    """
    first = max(0, -(-(start_batch - worker) // num_workers))
    end = max(0, -(-(batches_per_rank - worker) // num_workers))
    return first, max(0, end - first)


def start_iterator(loader: Iterable) -> "LoaderIterator":
    """`iter(loader)` as the training and evaluation loops need it.

    - Creating a DataLoader iterator draws a seed from torch's global generator: that
      draw is kept out of the training stream (a resumed run draws what the original did).
    - Its worker processes are forked with the stop signals blocked. A cluster that
      pre-empts a job signals every process, and a worker would die of SIGTERM (torch
      installs its own handler there) and take the step down with it; with the signals
      blocked only the training process reacts, finishes the step and saves. Workers still
      exit when the loader shuts them down or their parent dies. (Inherited with the
      default "fork" start method.)
    - Because SIGTERM does not stop them, the iterator is a `LoaderIterator`: closed on
      every way out (an error, `close()`, interpreter exit), it kills what does not stop.
    """
    global _exit_hook_registered
    with stop_signals_blocked(), torch.random.fork_rng(devices=[]):
        iterator = LoaderIterator(iter(loader))
    if not _exit_hook_registered:
        # Exit handlers run last registered first: this one runs before multiprocessing's
        # (registered when it was imported, above), which would SIGTERM the workers and
        # join them without a timeout, and before torch's exit flag turns its shutdown off.
        atexit.register(_close_open_iterators)
        _exit_hook_registered = True
    return iterator


class LoaderIterator:
    """A DataLoader iterator whose worker processes are stopped on every way out.

    The workers run with SIGTERM blocked (`start_iterator`), so neither torch's own last
    resort (`terminate()` after a join timeout) nor Python's multiprocessing exit handler
    (SIGTERM to its daemonic children, then a join without timeout) ends them: a run that
    left by an exception with the loader open would wait for them forever. Hence:

    - `close()` lets torch shut the workers down (bounded joins), then SIGKILLs any that
      are still alive: a worker stuck on a read, whose batches nobody wants any more;
    - an error from the loader closes it before it propagates. A `ShardDataError` raised
      in a worker, which torch re-raises with the worker's traceback as its message, is
      raised again with its own one-line message (the worker's error chained to it);
    - at interpreter exit, every iterator still open is closed (`_close_open_iterators`).
    """

    def __init__(self, iterator: Iterator):
        self._it: Iterator | None = iterator
        _open_iterators.add(self)

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise
        except BaseException as error:
            self.close()
            reported = _worker_data_error(error)
            if reported is None:
                raise
            raise reported from error

    def close(self) -> None:
        """Stop the worker processes (idempotent). A worker that does not stop by itself
        costs about 2 x torch's status interval (5 s) before it is killed."""
        it, self._it = self._it, None
        if it is None:
            return
        _open_iterators.discard(self)
        workers = list(getattr(it, "_workers", ()))  # none when the loader has no workers
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # done event, then a join per worker with a timeout
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5.0)


_open_iterators: "weakref.WeakSet[LoaderIterator]" = weakref.WeakSet()
_exit_hook_registered = False


def _close_open_iterators() -> None:
    for iterator in list(_open_iterators):
        iterator.close()


def _worker_data_error(error: BaseException) -> ShardDataError | None:
    """The one-line `ShardDataError` a worker raised, if `error` is torch's re-raise of one."""
    if not isinstance(error, ShardDataError):
        return None
    text = str(error)
    # torch's message: "Caught ShardDataError in DataLoader worker process N.\nOriginal
    # Traceback ...", ending with the formatted exception line "module.ShardDataError: msg".
    marker = f"{ShardDataError.__module__}.{ShardDataError.__qualname__}: "
    if not text.startswith("Caught ") or marker not in text:
        return None  # raised in this process (no workers): its message is already the story
    return ShardDataError(text.rsplit(marker, 1)[1].strip())


class TrainStream(IterableDataset):
    """One rank's training batches for one epoch; the pipeline is built in each worker.

    The transform is made here, in the parent: the forked workers inherit timm already
    imported instead of each importing it again. `augment_on` ("worker" | "device",
    resolved): the workers augment, or pass windows and parameters on (`DeviceAugment`).
    """

    def __init__(
        self, cfg: DataConfig, clip: ClipConfig, urls: list[str], *, epoch: int, rank: int, batches_per_rank: int,
        start_batch: int, decoder: str, stats: SkipStats, num_classes: int,
        batch_ratios: Callable[[int], tuple[float, ...]] | None = None, augment_on: str = "worker",
    ):
        super().__init__()
        self.cfg, self.clip, self.urls, self.epoch, self.rank = cfg, clip, urls, epoch, rank
        self.batches_per_rank, self.start_batch = batches_per_rank, start_batch
        self.decoder, self.stats, self.num_classes = decoder, stats, num_classes
        self.batch_ratios = batch_ratios
        if augment_on == "device":
            self.make_clip = clip_for_device(AugmentDraw(cfg, clip), clip.img_size)
        elif augment_on == "worker":
            self.make_clip = augmented_clip(TrainTransform(cfg, clip))
        else:
            raise ValueError(f"augment_on is 'worker' or 'device' here (see resolve_augment_on), got {augment_on!r}")

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_slot()
        # Rotate roles so the DataLoader's round robin, which always starts at worker 0,
        # starts at batch `start_batch` (made by role start_batch mod W in the full epoch).
        role = (worker + self.start_batch) % num_workers
        first_batch, num_batches = worker_batches(self.batches_per_rank, num_workers, role, self.start_batch)
        ratios = None
        first_sample = first_batch * self.cfg.videos_per_batch
        if self.batch_ratios is not None:
            # The worker's batches j are the rank's batches j * W + role; skip the clips of the
            # earlier ones (whole videos: sizes are multiples of clips_per_video).
            ratios_of = [self.batch_ratios(j * num_workers + role) for j in range(first_batch + num_batches)]
            ratios = ratios_of[first_batch:]
            first_sample = sum(len(r) for r in ratios_of[:first_batch]) // self.cfg.clips_per_video
        stages = train_stages(
            self.cfg, self.clip, self.urls, epoch=self.epoch, rank=self.rank, worker=role,
            first_sample=first_sample, num_batches=num_batches,
            make_clip=self.make_clip, decoder=self.decoder, stats=self.stats, num_classes=self.num_classes,
            batch_ratios=ratios,
        )
        yield from wds.DataPipeline(*stages)


class EvalStream(IterableDataset):
    """One rank's evaluation views; shards are split between the workers at iteration."""

    def __init__(
        self, cfg: DataConfig, clip: ClipConfig, rank_urls: list[str], *, decoder: str, stats: SkipStats,
        num_classes: int,
    ):
        super().__init__()
        self.cfg, self.clip, self.rank_urls, self.decoder, self.stats = cfg, clip, rank_urls, decoder, stats
        self.num_classes = num_classes
        self.transform = EvalTransform(cfg, clip)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_slot()
        stages = eval_stages(
            self.cfg, self.clip, self.rank_urls[worker::num_workers], transform=self.transform, decoder=self.decoder,
            stats=self.stats, num_classes=self.num_classes,
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

    `len()` is the number of batches this iterator yields: batches_per_epoch - start_batch.
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
    cfg: DataConfig,
    clip: ClipConfig,
    train_set: ShardSet,
    *,
    batches_per_epoch: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_classes: int,
    start_batch: int = 0,
    batch_ratios: Callable[[int], tuple[float, ...]] | None = None,
    augment_on: str = "worker",
) -> TrainLoader:
    """Training batches of `rank` for `epoch`: `batches_per_epoch` of them (the run plan's
    loader batches per rank), resumed at batch `start_batch` of the epoch. Samples whose
    label is not below `num_classes` (the model's) are skipped and counted ("label").
    `batch_ratios(k)`: the mask ratios of the clips of the rank's batch k of the epoch
    (token budgets, `marscale.tokens.batches`): batch k holds that many clips and carries
    the ratios as "ratios" (float64 [B]); None: `cfg.batch_size` clips each. `augment_on`: "worker"
    (augmented uint8 [B, C, T, S, S] batches) or "device" (decoded windows uint8
    [B, T, H, W, 3] and their "augment" parameters, for `device_augment.DeviceAugment`),
    `config.resolve_augment_on` of the training device."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    if not 0 <= start_batch <= batches_per_epoch:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {batches_per_epoch} batches")
    stats = SkipStats()
    stream = TrainStream(
        cfg, clip, list(train_set.shards), epoch=epoch, rank=rank, batches_per_rank=batches_per_epoch,
        start_batch=start_batch, decoder=resolve_decoder(cfg.decoder), stats=stats, num_classes=num_classes,
        batch_ratios=batch_ratios, augment_on=augment_on,
    )
    return TrainLoader(_dataloader(stream, cfg.num_workers), batches_per_epoch, start_batch, stats)


def build_eval_loader(
    cfg: DataConfig, clip: ClipConfig, val_set: ShardSet, *, rank: int, world_size: int, num_classes: int
) -> EvalLoader:
    """Every view of every evaluation video, each read once over all ranks and workers.

    Samples with a label not below `num_classes` (the model's) or a key that is not a
    sample index are skipped and counted ("label", "key"), not failed: see the module
    docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    readers = world_size * max(1, cfg.num_workers)
    if len(val_set.shards) < readers:
        raise ValueError(
            f"{val_set.root} has {len(val_set.shards)} shards but evaluation reads with {world_size} ranks x "
            f"{max(1, cfg.num_workers)} workers = {readers} readers, each of which needs a shard; "
            f"re-shard the evaluation set with smaller shards or lower num_workers"
        )
    # split_by_node then split_by_worker, with the rank given explicitly (not read from
    # the environment), so the engine and the tests can build any rank's loader.
    rank_urls = list(val_set.shards[rank::world_size])
    rank_videos = val_set.shard_videos[rank::world_size]
    workers = max(1, cfg.num_workers)
    num_batches = sum(
        math.ceil(sum(rank_videos[w::workers]) * cfg.views_per_video / cfg.eval_batch_size) for w in range(workers)
    )
    stats = SkipStats()
    stream = EvalStream(
        cfg, clip, rank_urls, decoder=resolve_decoder(cfg.decoder), stats=stats, num_classes=num_classes
    )
    return EvalLoader(_dataloader(stream, cfg.num_workers), num_batches, sum(rank_videos), stats)


def train_batches(
    cfg: DataConfig,
    clip: ClipConfig,
    train_set: ShardSet,
    *,
    num_classes: int,
    batches_per_epoch: int,
    rank: int,
    world_size: int,
    start: tuple[int, int],
    tally=None,
    batch_ratios: Callable[[int, int], tuple[float, ...]] | None = None,
    augment_on: str = "worker",
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's training batches, epoch after epoch, from the data position `start`,
    (epoch, batch in epoch): the rest of that epoch, then every batch of each epoch after
    it. The position is followed here rather than read from the caller when an epoch's
    loader opens: the caller may take batches a step ahead of the step that trains on them
    (`marscale.data.prefetch`). `tally` (optional: `open(loader)`, `close()`) follows each
    epoch's loader for its skip counts. `batch_ratios(epoch, k)`: the mask ratios of batch
    k of an epoch, when its size follows them (token budgets). `augment_on`: as
    `build_train_loader`.
    """
    epoch, first = start
    while True:
        loader = build_train_loader(
            cfg, clip, train_set, batches_per_epoch=batches_per_epoch, epoch=epoch, rank=rank,
            world_size=world_size, start_batch=first, num_classes=num_classes,
            batch_ratios=None if batch_ratios is None else functools.partial(batch_ratios, epoch),
            augment_on=augment_on,
        )
        it = start_iterator(loader)
        if tally is not None:
            tally.open(loader)
        try:
            for index in range(first, batches_per_epoch):
                batch = next(it, None)
                if batch is None:
                    # Continuing would leave this rank a step behind the others (a hang
                    # under ZeRO): fail loudly instead.
                    raise RuntimeError(
                        f"rank {rank}: the training loader ended after {index} of "
                        f"{batches_per_epoch} batches of epoch {epoch}"
                    )
                yield batch
        finally:
            # Stops the worker processes on every way out: they ignore SIGTERM, so one left
            # running would keep an erroring run from exiting (LoaderIterator).
            it.close()
            if tally is not None:
                tally.close()
        epoch, first = epoch + 1, 0
