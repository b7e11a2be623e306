"""Multi-view evaluation, exact across ranks: top-1 / top-5 over videos.

Every evaluation video is cut into `test_num_clips x test_num_crops` views; the model
scores each view (softmax), the scores of a video's views are averaged, and the
average decides the video's prediction. The evaluation loader gives every view to
exactly one rank, tagged with its video index (the sample key of the shard set). Each
rank adds its views' scores into a [num_videos, K] table; one all-reduce sums the tables,
so every video is counted once whatever the number of ranks, workers or batches.

MAR models are evaluated with the deterministic evaluation mask (`make_mask(train=False)`):
the same visible tokens for every view. Two options of the MAR reference change that:
`masking.eval_temporal_shuffle` permutes the mask's time slices per view (seeded by the
video index and view, so the result does not depend on batching), and
`masking.eval_complement` scores every view a second time with the complementary mask
and averages the two passes' logits.

Ranks may get different numbers of batches (shards differ in size). Outside ZeRO-3 that
is fine: the forward pass has no collectives. Under ZeRO-3 every forward gathers
parameters with collectives, so ranks must run the same number of forwards: with
`lockstep=True` the ranks agree before each batch whether anyone still has data, and a
rank that has run out scores a dummy batch whose result it throws away.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
import torch.distributed as torch_dist

from marscale.core import dist
from marscale.core.clip import ClipConfig
from marscale.data import DataConfig
from marscale.engine.metrics import format_counts, sum_over_ranks
from marscale.tokens.masking import MaskingConfig, make_mask, shuffle_time_slices
from marscale.tokens.packing import PackedTokens, pack_mask
from marscale.core.seeding import derive_seed
from marscale.data.shards import ShardSet

logger = logging.getLogger(__name__)

# forward(video [B,C,T,H,W] normalised, tokens: PackedTokens | None (every token)) -> logits [B, K]
Forward = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclasses.dataclass
class EvalResult:
    top1: float
    """Video-level top-1 accuracy, percent."""
    top5: float
    """Video-level top-k accuracy with k = min(5, classes), percent."""
    num_videos: int
    """Videos that got at least one view scored."""
    expected_videos: int
    """Videos in the evaluation manifest."""
    num_views: int
    """Views scored over all ranks."""
    incomplete_videos: int
    """Videos scored with fewer (or more) views than clips x crops (skipped views)."""
    skipped_samples: dict[str, int]
    """Samples the evaluation loaders skipped over all ranks, per reason
    (`marscale.data.stages.SKIP_REASONS`): unreadable shards count 1 each."""
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ScoreTable:
    """This rank's view scores, kept on the device until `reduce` (no host sync per batch)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._indices: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, labels: torch.Tensor, video_index: torch.Tensor) -> None:
        """scores [B, K] (probabilities), labels [B], video_index [B]."""
        self._scores.append(scores.double())
        self._labels.append(labels.long())
        self._indices.append(video_index.long())

    def reduce(self, num_videos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective. Sum the tables of all ranks: (score sums [V, K] float64, view counts
        [V], labels [V] (-1: no view)). V is at least `num_videos`, more if a video index
        beyond it was seen."""
        if self._indices:
            idx = torch.cat(self._indices).to(device)
            scores = torch.cat(self._scores).to(device)
            labels = torch.cat(self._labels).to(device)
        else:
            idx = torch.zeros(0, dtype=torch.long, device=device)
            scores = torch.zeros(0, self.num_classes, dtype=torch.float64, device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
        size = torch.tensor([max(num_videos, int(idx.max()) + 1 if idx.numel() else 0)], device=device)
        if dist.is_initialized():
            torch_dist.all_reduce(size, op=torch_dist.ReduceOp.MAX)
        size = int(size.item())
        sums = torch.zeros(size, self.num_classes, dtype=torch.float64, device=device).index_add_(0, idx, scores)
        counts = torch.zeros(size, dtype=torch.float64, device=device).index_add_(
            0, idx, torch.ones_like(idx, dtype=torch.float64)
        )
        video_labels = torch.full((size,), -1, dtype=torch.long, device=device).scatter_(0, idx, labels)
        if dist.is_initialized():
            torch_dist.all_reduce(sums)
            torch_dist.all_reduce(counts)
            torch_dist.all_reduce(video_labels, op=torch_dist.ReduceOp.MAX)
        return sums, counts, video_labels


def video_accuracy(sums: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Top-k accuracy (percent) of the per-video mean scores over the videos with a view.

    k is capped at the number of classes.
    """
    seen = counts > 0
    if not bool(seen.any()):
        return {k: 0.0 for k in ks}
    mean = sums[seen] / counts[seen].unsqueeze(1)
    target = labels[seen]
    out = {}
    for k in ks:
        topk = mean.topk(min(k, mean.shape[1]), dim=1).indices  # [V, k]
        out[k] = 100.0 * (topk == target.unsqueeze(1)).any(dim=1).double().mean().item()
    return out


@torch.no_grad()
def evaluate(
    forward: Forward,
    data_cfg: DataConfig,
    clip: ClipConfig,
    masking_cfg: MaskingConfig,
    val_set: ShardSet,
    token_grid: tuple[int, int, int],
    num_classes: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lockstep: bool = False,
) -> EvalResult:
    """Score every view of the evaluation set on all ranks (collective).

    `forward` runs the model in eval mode on `val_set` (the run plan's evaluation set, token
    grid and classes). lockstep: run the same number of forwards on every rank (needed
    under ZeRO-3, see the module docstring).
    """
    from marscale.data import build_eval_loader, normalize, start_iterator

    start = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    loader = build_eval_loader(data_cfg, clip, val_set, rank=rank, world_size=world_size, num_classes=num_classes)
    expected = val_set.num_videos
    lockstep = lockstep and world_size > 1
    masks: dict[int, tuple[PackedTokens, PackedTokens | None] | None] = {}

    def layouts(batch: int, views: torch.Tensor | None) -> tuple[PackedTokens, PackedTokens | None] | None:
        """(tokens, complement or None) on the device for `batch` views, or None (no mask).
        views: [B, 2] (video index, view) when the mask is shuffled per view."""

        def packed(mask: torch.Tensor) -> tuple[PackedTokens, PackedTokens | None]:
            complement = pack_mask(~mask).to(device) if masking_cfg.eval_complement else None
            return pack_mask(mask).to(device), complement

        if views is None or not masking_cfg.eval_temporal_shuffle:
            # Deterministic: one mask per batch size, built once on the host.
            if batch not in masks:
                mask = make_mask(masking_cfg, batch, token_grid, None, train=False)
                masks[batch] = None if mask is None else packed(mask)
            return masks[batch]
        mask = make_mask(masking_cfg, batch, token_grid, None, train=False)
        if mask is None:
            return None
        generators = [torch.Generator().manual_seed(derive_seed(int(v), int(k))) for v, k in views.tolist()]
        return packed(shuffle_time_slices(mask, token_grid, generators))

    table = ScoreTable(num_classes)
    it = start_iterator(loader)
    views = 0
    try:
        while True:
            batch = next(it, None)
            if lockstep:
                more = torch.tensor([0 if batch is None else 1], device=device)
                torch_dist.all_reduce(more, op=torch_dist.ReduceOp.MAX)
                if not more.item():
                    break
            elif batch is None:
                break
            real = batch is not None
            if real:
                video = batch["video"].to(device, non_blocking=True)
            else:  # this rank is done but another is not: keep the collectives in step
                video = torch.zeros(
                    (data_cfg.eval_batch_size, 3, clip.num_frames, clip.img_size, clip.img_size),
                    dtype=torch.uint8,
                    device=device,
                )
            views_of_batch = torch.stack([batch["video_index"], batch["view"]], dim=1) if real else None
            tokens, complement = layouts(video.shape[0], views_of_batch) or (None, None)
            x = normalize(video, clip.mean, clip.std, dtype)
            logits = forward(x, tokens)
            if complement is not None:
                # The complementary pass: the masked tokens visible. Every rank runs it (lockstep).
                logits = (logits.float() + forward(x, complement).float()) / 2
            if real:
                table.add(
                    torch.softmax(logits.float(), dim=-1),
                    batch["label"].to(device),
                    batch["video_index"].to(device),
                )
                views += video.shape[0]
    finally:
        # On every way out: the workers ignore SIGTERM, so a worker left running after an
        # error would keep the process from exiting (LoaderIterator).
        it.close()
    sums, counts, labels = table.reduce(expected, device)
    total_views = torch.tensor([views], device=device)
    if dist.is_initialized():
        torch_dist.all_reduce(total_views)
    skipped = sum_over_ranks(loader.skipped(), world_size, device)
    acc = video_accuracy(sums, counts, labels)
    seen = counts > 0
    result = EvalResult(
        top1=acc[1],
        top5=acc[5],
        num_videos=int(seen.sum().item()),
        expected_videos=expected,
        num_views=int(total_views.item()),
        incomplete_videos=int((counts[seen] != data_cfg.views_per_video).sum().item()),
        skipped_samples=skipped,
        seconds=time.perf_counter() - start,
    )
    if result.num_videos != expected or result.incomplete_videos:
        logger.warning(
            "evaluation scored %d of %d videos, %d with a different number of views than %d "
            "(skipped samples are left out: %s)",
            result.num_videos,
            expected,
            result.incomplete_videos,
            data_cfg.views_per_video,
            format_counts(result.skipped_samples),
        )
    return result
