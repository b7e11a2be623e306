"""The stages of the WebDataset video pipelines, in order, and the skip counter they share.

Training stages, run inside each DataLoader worker (`train_stages`)::

    resampled shards   each (rank, worker) draws its own endless shard stream, seeded by
                       (seed, epoch, rank, worker): this replaces split_by_node /
                       split_by_worker, so no rank can run out of shards or hang
    open               each shard (webdataset's gopen), closed when the next is read
    tar -> samples     tar_file_expander + group_by_keys; unreadable shards and members
                       are logged, counted and skipped (`SkipStats`)
    complete samples   keep samples with a video and a label in [0, num_classes) (else count
                       and skip, naming the shard and key: reasons "incomplete", "label")
    shuffle            sample-level buffer of `shuffle_buffer`, seeded likewise
    number, skip       enumerate + wds.slice: the n-th sample of the worker's stream gets
                       the random generator (seed, epoch, rank, worker, n); samples before a
                       resumed batch are dropped here, before any decoding
    decode + augment   `clips_per_video` clips per video: one temporal window for all
                       (clip_windows "shared") or one each ("independent"), the union of
                       their frames decoded in one pass; each clip's augmentation drawn on
                       its own and applied here (augment_on "worker") or passed on with the
                       window for the device (`device_augment`), flipped labels swapped
                       (flip_label_pairs); bad videos counted and skipped
    take, batch        wds.slice to this worker's share of the epoch, then wds.batched:
                       `batch_size` clips -> {"video": uint8 [B, C, T, H, W], "label": int64 [B]}
                       (device: "video" uint8 [B, T, H, W, 3] padded, "augment" parameters)

webdataset's own stages are used where they give the same stream (shuffle, slice,
batched, SimpleShardList). Shard resampling stays here: `wds.ResampledShards` seeds
Python's generator with a folded 31-bit seed whose (seed, epoch, worker) combinations
collide and reads the real worker id, while resume needs the rotated worker role.
Opening stays here too, to close each shard as soon as the next is read.

Evaluation stages (`eval_stages`): this reader's shards in order, read once, the same
complete samples, each tagged with its video index (from the sample key; a key that is
not a marscale key is counted and skipped, reason "key"), every (clip, crop) view of
every video tagged with that index and its view number, batches of `eval_batch_size`
views (the last one may be smaller).

Evaluation skips and counts bad samples too, rather than failing: a reader that raised
on one rank would leave the other ranks waiting in the score all-reduce. The result
still shows them (videos scored vs the manifest's, `engine/evaluate.py`), and labels
the manifest already knows to be out of range fail before training starts
(`engine/preflight.py`).

How the stages are placed in workers, and the epoch arithmetic, are in `loaders.py`.
"""

from __future__ import annotations

import logging
import multiprocessing
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from marscale.core.clip import ClipConfig
from marscale.data import sampling
from marscale.data.config import DataConfig
from marscale.data.decode import DecodeError, open_sample
from marscale.data.augment_params import AugmentDraw
from marscale.data.transforms import EvalTransform, TrainTransform
from marscale.core.seeding import seed_word, seed_words
from marscale.data.shards import LABEL_EXT, META_EXT, VIDEO_EXTENSIONS, SampleMeta, key_to_index

log = logging.getLogger(__name__)

SKIP_REASONS = ("read", "incomplete", "label", "key", "decode")
# After this many bad samples in a row a worker stops: the data is broken, not noisy.
MAX_CONSECUTIVE_SKIPS = 200
# Tags that keep the random streams of one worker independent of each other.
_SHARD_STREAM, _SHUFFLE_STREAM, _SAMPLE_STREAM = 0, 1, 2


class ShardDataError(ValueError):
    """The shards are broken, not noisy: too many bad samples in a row. Bad input, so the
    command line reports it in one line (a ValueError); raised inside a loader worker, it
    reaches the training process through `marscale.data.loaders.LoaderIterator`."""


class SkipStats:
    """Counts of skipped samples per reason, shared by the worker processes of a loader.

    The counts are shared memory created before the workers start: the main process sees
    each worker's skips as they happen (`as_dict`), not only when the loader ends.
    """

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
            raise ShardDataError(
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
        """{reason: samples skipped so far}, over every worker of the loader.

        Read without the lock: the counts only grow, and a worker killed while holding it
        (a loader shut down on an error path) must not block the reader.
        """
        return dict(zip(SKIP_REASONS, self._counts.get_obj()[:]))


def resampled_shards(urls: list[str], words: list[int]) -> Callable[[], Iterator[dict]]:
    """An endless stream of {"url": shard} drawn with replacement, seeded by `words`."""

    def stream() -> Iterator[dict]:
        rng = np.random.default_rng(words)
        while True:
            yield {"url": urls[int(rng.integers(len(urls)))]}

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


def complete_samples(stats: SkipStats, num_classes: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Raw tar samples -> {"key", "url" (its shard), "video" (bytes), "ext" (its member's
    extension), "meta" (the JSON record's bytes, None if absent), "label" (int in
    [0, num_classes), the model's classes)}; others counted and dropped.

    A label past the model's classes would index past the one-hot targets of mixup in
    training and be scored as a class the model cannot predict in evaluation.
    """

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__")
            video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            if video_ext is None or LABEL_EXT not in sample:
                missing = [name for name, ok in (("video", video_ext), (LABEL_EXT, LABEL_EXT in sample)) if not ok]
                stats.skip("incomplete", key, f"no {' or '.join(missing)} member in {url}")
                continue
            try:
                label = int(sample[LABEL_EXT].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as e:
                stats.skip("label", key, f"label is not an integer in {url}: {e}")
                continue
            if not 0 <= label < num_classes:
                stats.skip("label", key, f"label {label} is outside the model's classes 0..{num_classes - 1} in {url}")
                continue
            yield {"key": key, "url": url, "video": sample[video_ext], "ext": video_ext,
                   "meta": sample.get(META_EXT), "label": label}

    return stage


def indexed_samples(stats: SkipStats) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Complete samples -> the same with "video_index" (`shards.key_to_index` of the key),
    which evaluation sums each video's view scores under; other keys counted and dropped."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                index = key_to_index(sample["key"])
            except ValueError as e:
                stats.skip("key", sample["key"], f"{e} in {sample['url']}")
                continue
            yield {**sample, "video_index": index}

    return stage


def _decode(
    sample: dict, decoder: str, frame_indices: Callable[[int, float], list[np.ndarray]], stats: SkipStats,
    threads: int = 1,
):
    """Decode the frames `frame_indices(num_frames, fps)` need, the union of all its index
    arrays in one pass: (distinct frames, per-array positions into them).

    The frame count and rate come from the sample's record (its frame table), and the
    frames from `decoder` where the record says it reads this video exactly, else from
    PyAV (`decode.open_sample`); a sample without a record is read as it is."""
    reader = None
    try:
        reader = open_sample(sample["video"], sample.get("ext", ""), _meta(sample.get("meta")), decoder, threads)
        clips = frame_indices(reader.num_frames, reader.fps)
        wanted, positions = np.unique(np.stack(clips), return_inverse=True)
        frames = reader.get_frames(wanted)
    except (DecodeError, sampling.FrameRateError) as e:
        stats.skip("decode", sample["key"], f"{decoder}: {e} in {sample['url']}")
        return None
    finally:
        if reader is not None:
            reader.close()
    stats.good()
    return frames, positions.reshape(len(clips), -1)


def _window(frames: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """frames[positions], without a copy when that is all of `frames` in order (one window
    of distinct frames: the usual case)."""
    if len(positions) == len(frames) and (positions == np.arange(len(frames))).all():
        return frames
    return frames[positions]


def _meta(data: bytes | None) -> SampleMeta | None:
    """The sample's record, or None without one; DecodeError (counted) when it is unreadable."""
    if data is None:
        return None
    try:
        return SampleMeta.from_json(data)
    except (ValueError, TypeError) as e:
        raise DecodeError(f"unreadable .{META_EXT} record: {e}") from e


def train_windows(cfg: DataConfig, clip: ClipConfig, num_video_frames: int, fps: float, rng: np.random.Generator):
    """The temporal windows of one video's clips: [T] index arrays, one shared by all
    `clips_per_video` clips or one per clip (`cfg.clip_windows`)."""
    count = cfg.clips_per_video if cfg.clip_windows == "independent" else 1
    return [sampling.train_indices(clip, num_video_frames, fps, rng) for _ in range(count)]


ClipMaker = Callable[[np.ndarray, np.random.Generator], tuple[dict, bool]]
"""(window uint8 [T, H, W, 3], the clip's generator) -> (the clip's item fields, flipped)."""


def augmented_clip(transform: TrainTransform) -> ClipMaker:
    """augment_on "worker": the augmented clip {"video": uint8 [C, T, S, S]}."""

    def make(window: np.ndarray, rng: np.random.Generator) -> tuple[dict, bool]:
        video, flipped = transform(window, rng)
        return {"video": video}, flipped

    return make


def clip_for_device(draw: AugmentDraw, img_size: int) -> ClipMaker:
    """augment_on "device": the window as decoded {"video": uint8 [T, H, W, 3]} and its
    augmentation parameters {"augment": `ClipParams.to_tensors`}, drawn as the worker path draws them."""

    def make(window: np.ndarray, rng: np.random.Generator) -> tuple[dict, bool]:
        params = draw(window.shape[1], window.shape[2], rng)
        fields = {"video": torch.from_numpy(window), "augment": params.to_tensors(draw.num_layers, img_size)}
        return fields, params.flipped

    return make


def decode_train_clips(
    cfg: DataConfig, clip: ClipConfig, make_clip: ClipMaker, decoder: str, stats: SkipStats, words: list[int]
) -> Callable[[Iterable[tuple[int, dict]]], Iterator[dict]]:
    """(n, sample) -> `clips_per_video` clips {**make_clip's fields, "label"}: augmented
    uint8 [C, T, H, W] clips (`augmented_clip`), or windows and parameters for the device
    (`clip_for_device`).

    Repeated augmentation as in VideoMAE/MAR, decoded once per video: with shared windows
    the clips are independent spatial augmentations of one frame sample; with
    independent windows (the MAR reference) each clip also has its own window, and the
    frames of all windows are decoded together. A flipped clip's label goes through
    `cfg.flip_label_map`. Every draw comes from the sample's generator, in a fixed order
    (windows, then each clip's augmentation), so a resumed epoch repeats it.
    """
    flip_label_map = cfg.flip_label_map

    def stage(numbered: Iterable[tuple[int, dict]]) -> Iterator[dict]:
        for n, sample in numbered:
            rng = np.random.default_rng(words + [n])
            decoded = _decode(sample, decoder, partial(train_windows, cfg, clip, rng=rng), stats, cfg.decode_threads)
            if decoded is None:
                continue
            frames, positions = decoded
            for k in range(cfg.clips_per_video):
                window = _window(frames, positions[k % len(positions)])  # [T, H, W, 3]; shared: one row for all
                fields, flipped = make_clip(window, rng)
                label = flip_label_map.get(sample["label"], sample["label"]) if flipped else sample["label"]
                yield {**fields, "label": label}

    return stage


def decode_eval_views(
    cfg: DataConfig, clip: ClipConfig, transform: EvalTransform, decoder: str, stats: SkipStats
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """indexed sample -> its test_num_clips x test_num_crops views, tagged with video index and view."""

    def indices(num_video_frames: int, fps: float) -> list[np.ndarray]:
        return list(sampling.eval_indices(clip, num_video_frames, fps, cfg.test_num_clips))

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            decoded = _decode(sample, decoder, indices, stats, cfg.decode_threads)
            if decoded is None:
                continue
            for view, video in enumerate(transform(*decoded)):
                yield {"video": video, "label": sample["label"], "video_index": sample["video_index"], "view": view}

    return stage


def collate(items: list[dict]) -> dict:
    """Stack items: "video" -> uint8 [B, ...], "augment" (a dict of tensors) -> each
    stacked, every other field -> int64 [B].

    Videos of different sizes (decoded windows of the device path: [T, H, W, 3]) are
    zero-padded at the bottom and right to the largest; each clip's parameters keep its
    own size. Given to `wds.batched` explicitly: its default collation would turn the
    labels into numpy arrays.
    """
    videos = [item["video"] for item in items]
    shape = [max(sizes) for sizes in zip(*(v.shape for v in videos))]
    # In a loader worker the batch goes to the training process through shared memory:
    # build it there, as torch's default_collate does, rather than copy it there later.
    out = {"video": _batch_tensor([len(videos), *shape], videos[0].dtype)}
    if all(list(v.shape) == shape for v in videos):
        torch.stack(videos, out=out["video"])
    else:
        out["video"].zero_()
        for b, v in enumerate(videos):
            out["video"][(b, *(slice(0, n) for n in v.shape))] = v
    for name in items[0]:
        if name == "augment":
            out[name] = {k: torch.stack([item[name][k] for item in items]) for k in items[0][name]}
        elif name != "video":
            out[name] = torch.tensor([item[name] for item in items], dtype=torch.int64)
    return out


def _batch_tensor(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch: in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).share_memory_()


def train_stages(
    cfg: DataConfig,
    clip: ClipConfig,
    urls: list[str],
    *,
    epoch: int,
    rank: int,
    worker: int,
    first_sample: int,
    num_batches: int,
    make_clip: ClipMaker,
    decoder: str,
    stats: SkipStats,
    num_classes: int,
    batch_ratios: list[tuple[float, ...]] | None = None,
) -> list:
    """The training pipeline of one (rank, worker) as an explicit list of stages.
    `batch_ratios`: the mask ratios of the clips of each of the worker's `num_batches`
    batches (token budgets): that many clips each, instead of `cfg.batch_size`."""
    if batch_ratios is not None and len(batch_ratios) != num_batches:
        raise ValueError(f"{len(batch_ratios)} batch ratio lists for {num_batches} batches")
    batching = (
        [wds.slice(num_batches * cfg.batch_size), wds.batched(cfg.batch_size, collation_fn=collate, partial=False)]
        if batch_ratios is None
        else [sized_batches(batch_ratios)]
    )
    base = (cfg.seed, epoch, rank, worker)
    shuffle_seed = seed_word(*base, _SHUFFLE_STREAM)
    # Start yielding after 100 samples (not a full buffer) so the first batch comes quickly.
    shuffle = (
        [wds.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer), seed=shuffle_seed)]
        if cfg.shuffle_buffer > 1
        else []
    )
    return [
        resampled_shards(urls, seed_words(*base, _SHARD_STREAM)),
        opened_shards(stats),
        *tar_samples(stats),
        complete_samples(stats, num_classes),
        *shuffle,
        enumerate,  # (n, sample): n seeds the sample's augmentation
        wds.slice(first_sample, None),  # a resumed epoch drops earlier samples before decoding them
        decode_train_clips(cfg, clip, make_clip, decoder, stats, seed_words(*base, _SAMPLE_STREAM)),
        # This worker's share, cut in clips before batching: wds.batched waits for the next
        # item before releasing a batch, so a cut after it would decode one video too many.
        *batching,
    ]


def sized_batches(ratios: list[tuple[float, ...]]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """clips -> batches of len(ratios[0]), len(ratios[1]), ... clips (collated, each with
    its "ratios" as float64 [B]), then stop: a batch is released as soon as it is full, so
    no clip beyond the last batch is decoded."""

    def stage(clips: Iterable[dict]) -> Iterator[dict]:
        if not ratios:
            return
        it = iter(clips)
        for batch_ratios in ratios:
            size = len(batch_ratios)
            items = [item for _, item in zip(range(size), it)]
            if len(items) < size:
                return  # the stream ended early: the loader reports the missing batches
            batch = collate(items)
            batch["ratios"] = torch.tensor(batch_ratios, dtype=torch.float64)
            yield batch

    return stage


def eval_stages(
    cfg: DataConfig, clip: ClipConfig, urls: list[str], *, transform: EvalTransform, decoder: str, stats: SkipStats,
    num_classes: int,
) -> list:
    """The evaluation pipeline over `urls` (this reader's shards, in order) as a list of stages."""
    return [
        wds.SimpleShardList(urls),
        opened_shards(stats),
        *tar_samples(stats),
        complete_samples(stats, num_classes),
        indexed_samples(stats),
        decode_eval_views(cfg, clip, transform, decoder, stats),
        wds.batched(cfg.eval_batch_size, collation_fn=collate, partial=True),
    ]
