"""Multi-view evaluation: per-video averaging, top-k, and exact counting of every view."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from marscale.core import dist
from marscale.core.clip import ClipConfig
from marscale.data import DataConfig
from marscale.engine.evaluate import ScoreTable, evaluate, video_accuracy
from marscale.tokens.masking import MaskingConfig, make_mask
from marscale.data.shards import ShardSet


def indices(x, tokens):
    """(visible [B, Nv], masked [B, Nm]) token indices of a uniform layout, or (None, None)."""
    if tokens is None:
        return None, None
    assert tokens.uniform
    return tokens.visible_idx.view(x.shape[0], -1), tokens.masked_idx.view(x.shape[0], -1)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()  # a one-rank gloo group: the collectives run for real


def test_video_accuracy_averages_views_and_caps_k():
    # Video 0 (label 2): views disagree, the mean favours class 2. Video 1 (label 0): wrong
    # top-1, right within top-2. Video 2: no view (left out).
    sums = torch.tensor(
        [[0.1, 0.5, 0.4 + 0.9, 0.0], [0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    sums[0] = torch.tensor([0.1, 0.5, 0.4, 0.0]) + torch.tensor([0.0, 0.1, 0.9, 0.0])
    counts = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    labels = torch.tensor([2, 0, -1])
    acc = video_accuracy(sums, counts, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(50.0)
    assert acc[2] == pytest.approx(100.0)
    assert acc[5] == pytest.approx(100.0)  # k capped at 4 classes


def test_score_tables_split_over_ranks_add_up_to_one_table():
    g = torch.Generator().manual_seed(0)
    num_videos, views, K = 7, 6, 5
    video_index = torch.arange(num_videos).repeat_interleave(views)
    labels = torch.randint(0, K, (num_videos,), generator=g)[video_index]
    scores = torch.softmax(torch.randn(len(video_index), K, generator=g), dim=1)
    order = torch.randperm(len(video_index), generator=g)  # views arrive in any order

    whole = ScoreTable(K)
    whole.add(scores[order], labels[order], video_index[order])
    sums, counts, video_labels = whole.reduce(num_videos, torch.device("cpu"))

    # Two "ranks" with different numbers of batches; their tables added = the whole table.
    parts = [ScoreTable(K), ScoreTable(K)]
    for i, chunk in enumerate(order.split(5)):
        parts[i % 3 == 0].add(scores[chunk], labels[chunk], video_index[chunk])
    reduced = [p.reduce(num_videos, torch.device("cpu")) for p in parts]
    torch.testing.assert_close(reduced[0][0] + reduced[1][0], sums)
    torch.testing.assert_close(reduced[0][1] + reduced[1][1], counts)
    torch.testing.assert_close(torch.maximum(reduced[0][2], reduced[1][2]), video_labels)

    assert counts.tolist() == [views] * num_videos
    expected_mean = torch.stack([scores[video_index == v].double().mean(0) for v in range(num_videos)])
    torch.testing.assert_close(sums / counts[:, None], expected_mean)
    # A video index past the manifest's count grows the table instead of failing.
    extra = ScoreTable(K)
    extra.add(scores[:1], labels[:1], torch.tensor([9]))
    assert extra.reduce(num_videos, torch.device("cpu"))[0].shape == (10, K)


def test_evaluate_counts_every_view_once(synthetic_shards):
    cfg = DataConfig(
        train_shards=synthetic_shards["train"],
        val_shards=synthetic_shards["val"],
        short_side=32,
        test_num_clips=2,
        test_num_crops=3,
        eval_batch_size=5,  # does not divide the 6 views of a video
        num_workers=2,
    )
    seen = []

    def forward(x, tokens):
        visible_idx, masked_idx = indices(x, tokens)
        # The deterministic evaluation mask: the same visible tokens for every view.
        seen.append((x.shape, visible_idx, masked_idx))
        logits = torch.zeros(x.shape[0], 4)
        logits[:, 1] = 1.0  # always class 1: top-1 is the share of class-1 videos
        return logits

    masking = MaskingConfig(kind="cell_running", ratio=0.5)
    clip = ClipConfig(sampling="segment", num_frames=4, img_size=32)
    val_set = ShardSet.load(cfg.val_shards)
    result = evaluate(
        forward, cfg, clip, masking, val_set, (2, 2, 2), 4, device=torch.device("cpu"), dtype=torch.float32
    )
    assert result.expected_videos == 8 and result.num_videos == 8
    assert result.num_views == 8 * 6
    assert result.incomplete_videos == 0
    assert result.top1 == pytest.approx(25.0)  # 2 of the 8 validation videos are class 1
    assert result.top5 == pytest.approx(100.0)
    assert sum(s[0][0] for s in seen) == 48
    assert all(s[0][1:] == (3, 4, 32, 32) for s in seen)
    assert all(s[1].shape[1] == 4 and s[2].shape[1] == 4 for s in seen)  # 4 of 8 tokens visible
    first = seen[0][1][0]
    assert all(torch.equal(row, first) for s in seen for row in s[1])

    seen.clear()
    full = evaluate(
        forward, dataclasses.replace(cfg, num_workers=0), clip, MaskingConfig(kind="none"), val_set, (2, 2, 2), 4,
        device=torch.device("cpu"), dtype=torch.float32,
    )
    assert full.num_views == 48 and full.top1 == pytest.approx(25.0)
    assert all(s[1] is None and s[2] is None for s in seen)  # every token visible


def _eval_cfg(shards: dict[str, str], **kw) -> DataConfig:
    base = dict(
        train_shards=shards["train"], val_shards=shards["val"], short_side=32, test_num_clips=2,
        test_num_crops=1, eval_batch_size=3, num_workers=0,
    )
    return DataConfig(**{**base, **kw})


def test_eval_complement_averages_the_logits_of_mask_and_complement(synthetic_shards):
    cfg = _eval_cfg(synthetic_shards)
    clip = ClipConfig(sampling="segment", num_frames=4, img_size=32)
    val_set = ShardSet.load(cfg.val_shards)
    passes = []

    def forward(x, tokens):
        visible_idx, masked_idx = indices(x, tokens)
        passes.append((visible_idx.clone(), masked_idx.clone()))
        # Class 0 when token 0 is visible, class 2 otherwise: each pass votes for one class.
        logits = torch.zeros(x.shape[0], 4)
        sees_token_0 = (visible_idx == 0).any(dim=1)
        logits[sees_token_0, 0] = 4.0
        logits[~sees_token_0, 2] = 3.0
        return logits

    masking = MaskingConfig(kind="cell_running", ratio=0.5, eval_complement=True)
    result = evaluate(forward, cfg, clip, masking, val_set, (2, 2, 2), 4, device=torch.device("cpu"),
                      dtype=torch.float32)
    assert result.num_views == 16 and len(passes) == 2 * 6  # 6 batches of up to 3 views, two passes each
    for (vis, msk), (vis2, msk2) in zip(passes[0::2], passes[1::2]):
        assert torch.equal(vis2, msk) and torch.equal(msk2, vis)  # the complement
        union = torch.cat([vis, vis2], dim=1).sort(dim=1).values
        assert torch.equal(union, torch.arange(8).expand_as(union))  # together: every token
    # Each view is seen once with token 0 and once without: averaged logits 2.0 (class 0)
    # and 1.5 (class 2) for every view, so every video is called class 0: 2 of 8 right.
    assert result.top1 == pytest.approx(25.0) and result.top5 == pytest.approx(100.0)


def test_eval_temporal_shuffle_is_per_view_and_independent_of_batching(synthetic_shards):
    clip = ClipConfig(sampling="segment", num_frames=8, img_size=32)  # 4 x 2 x 2 tokens
    val_set = ShardSet.load(synthetic_shards["val"])
    masking = MaskingConfig(kind="cell_running", ratio=0.5, eval_temporal_shuffle=True)
    grid = (4, 2, 2)

    def run(batch_size: int) -> dict[tuple[int, int], torch.Tensor]:
        cfg = _eval_cfg(synthetic_shards, eval_batch_size=batch_size)
        masks: list[torch.Tensor] = []

        def forward(x, tokens):
            visible_idx, masked_idx = indices(x, tokens)
            masks.append(visible_idx)
            return torch.zeros(x.shape[0], 4)

        seen: dict[tuple[int, int], torch.Tensor] = {}
        loader_order = []
        from marscale.data import build_eval_loader

        for batch in build_eval_loader(cfg, clip, val_set, rank=0, world_size=1, num_classes=4):
            loader_order += list(zip(batch["video_index"].tolist(), batch["view"].tolist()))
        evaluate(forward, cfg, clip, masking, val_set, grid, 4, device=torch.device("cpu"), dtype=torch.float32)
        for key, visible in zip(loader_order, torch.cat(masks)):
            seen[key] = visible
        return seen

    a, b = run(3), run(5)
    assert a.keys() == b.keys() and len(a) == 16
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same mask for a view whatever the batching
    assert len({tuple(v.tolist()) for v in a.values()}) > 1  # views get different permutations
    fixed = make_mask(MaskingConfig(kind="cell_running", ratio=0.5), 1, grid, None, train=False)
    assert all(v.numel() == int((~fixed).sum()) for v in a.values())  # still half the tokens
