"""Tests for marscale.tokens.masking: cell running masks, random / tube masks, the packed layout of a
mask, and the one count of kept tokens."""

from __future__ import annotations

import pytest
import torch

from marscale.tokens.masking import (
    MaskingConfig,
    cell_running_mask,
    make_mask,
    random_mask,
    shuffle_time_slices,
    tube_mask,
    visible_tokens,
)
from marscale.tokens.packing import PackedTokens, pack_mask

GRIDS = [(8, 14, 14), (4, 4, 6), (2, 4, 4)]
RATIOS = [0.25, 0.5, 0.75]

# Visible positions per time slice (t mod 4) in a 2x2 cell, numbered 0 TL, 1 TR, 2 BL, 3 BR.
REFERENCE_VISIBLE = {
    0.5: [{2, 3}, {0, 3}, {0, 1}, {1, 2}],
    0.75: [{3}, {0}, {1}, {2}],
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cells(mask: torch.Tensor, grid) -> torch.Tensor:
    """bool [B, N] -> [B, T', cells, 4] with the 4 slots of each 2x2 cell in row-major order."""
    T, H, W = grid
    m = mask.view(-1, T, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 3, 5)
    return m.reshape(mask.shape[0], T, (H // 2) * (W // 2), 4)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(
    "mode",
    [
        dict(train=False),
        dict(train=True),
        dict(train=True, per_cell_phase=True),
        dict(train=True, temporal_shuffle=False),
    ],
)
def test_exact_ratio_in_every_clip_and_cell(grid, ratio, mode):
    mask = cell_running_mask(6, grid, ratio, gen(0), **mode)
    N = grid[0] * grid[1] * grid[2]
    assert mask.shape == (6, N) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [int(ratio * N)] * 6
    # Not only per clip: every cell of every slice masks exactly ratio x 4 slots.
    assert bool((cells(mask, grid).sum(dim=-1) == int(ratio * 4)).all())


@pytest.mark.parametrize("grid", [(8, 14, 14), (8, 4, 6)])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("per_cell_phase", [False, True])
def test_every_position_visible_within_four_slices(grid, ratio, per_cell_phase):
    mask = cell_running_mask(4, grid, ratio, gen(1), per_cell_phase=per_cell_phase, temporal_shuffle=False)
    T, H, W = grid
    visible = (~mask).view(4, T, H, W).int()
    for t0 in range(T - 3):
        # Over any 4 consecutive slices each position is seen exactly (4 - masked) times,
        # in particular at least once.
        seen = visible[:, t0 : t0 + 4].sum(dim=1)
        assert bool((seen == 4 - int(ratio * 4)).all()), t0


@pytest.mark.parametrize("grid", [(8, 14, 14), (8, 4, 6)])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_evaluation_pattern_is_the_reference_table(grid, ratio):
    mask = cell_running_mask(3, grid, ratio, gen(0), train=False)
    slots = cells(mask, grid)
    assert bool((slots == slots[:1]).all()), "evaluation masks must not depend on the clip"
    for t in range(grid[0]):
        for c in range(slots.shape[2]):
            visible = {i for i in range(4) if not slots[0, t, c, i]}
            assert visible == REFERENCE_VISIBLE[ratio][t % 4], (t, c)


def test_evaluation_pattern_ignores_the_generator():
    a = cell_running_mask(2, (8, 4, 4), 0.5, gen(0), train=False)
    b = cell_running_mask(2, (8, 4, 4), 0.5, gen(123), train=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("per_cell_phase", [False, True])
def test_seed_reproduces_masks(per_cell_phase):
    kw = dict(per_cell_phase=per_cell_phase)
    a = cell_running_mask(8, (8, 14, 14), 0.5, gen(7), **kw)
    b = cell_running_mask(8, (8, 14, 14), 0.5, gen(7), **kw)
    c = cell_running_mask(8, (8, 14, 14), 0.5, gen(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_phase_is_shared_by_cells_unless_per_cell():
    grid = (8, 4, 6)
    shared = cells(cell_running_mask(16, grid, 0.75, gen(3), temporal_shuffle=False), grid)
    assert bool((shared == shared[:, :, :1]).all())
    per_cell = cells(cell_running_mask(16, grid, 0.75, gen(3), temporal_shuffle=False, per_cell_phase=True), grid)
    assert not bool((per_cell == per_cell[:, :, :1]).all())
    # The phase is drawn per clip: 16 clips do not all share one.
    assert not bool((shared == shared[:1]).all())


@pytest.mark.parametrize("per_cell_phase", [False, True])
def test_temporal_shuffle_permutes_slices(per_cell_phase):
    grid, B = (8, 4, 6), 16
    kw = dict(per_cell_phase=per_cell_phase)
    # Same seed: the phase drawn first is the same; the shuffle only reorders slices.
    plain = cell_running_mask(B, grid, 0.5, gen(5), temporal_shuffle=False, **kw).view(B, grid[0], -1)
    shuffled = cell_running_mask(B, grid, 0.5, gen(5), temporal_shuffle=True, **kw).view(B, grid[0], -1)
    for b in range(B):
        as_rows = lambda m: sorted(tuple(r) for r in m.int().tolist())  # noqa: E731
        assert as_rows(shuffled[b]) == as_rows(plain[b]), b
    assert not torch.equal(plain, shuffled)


def test_invalid_ratio_and_grid():
    with pytest.raises(ValueError, match="whole number"):
        cell_running_mask(2, (8, 14, 14), 0.6)
    with pytest.raises(ValueError, match="whole number"):
        cell_running_mask(2, (8, 14, 14), 1.0)
    with pytest.raises(ValueError, match="not divisible"):
        cell_running_mask(2, (8, 15, 14), 0.5)
    with pytest.raises(ValueError, match="not divisible"):
        cell_running_mask(2, (4, 4, 6), 0.5, cell=(4, 4))
    with pytest.raises(ValueError):
        MaskingConfig(ratio=0.6)
    with pytest.raises(ValueError):
        MaskingConfig(kind="cell_running", ratio=0.5, eval_ratio=0.3)
    with pytest.raises(ValueError):
        MaskingConfig(kind="checkerboard")


def test_other_cell_sizes():
    # 1x2 cells at 50%: one of two slots masked per slice, alternating.
    mask = cell_running_mask(2, (4, 2, 4), 0.5, train=False, cell=(1, 2))
    rows = mask.view(2, 4, 2, 2, 2)  # [B, T, H, W/2, 2]
    assert bool((rows.sum(-1) == 1).all())
    assert bool((rows[:, 0] != rows[:, 1]).all())


@pytest.mark.parametrize("ratio", RATIOS + [0.9])
def test_random_and_tube_masks(ratio):
    grid = (8, 14, 14)
    N, S = 8 * 14 * 14, 14 * 14
    rnd = random_mask(4, grid, ratio, gen(0))
    assert rnd.sum(dim=1).tolist() == [round(ratio * N)] * 4
    assert not torch.equal(rnd[0], rnd[1])
    tube = tube_mask(4, grid, ratio, gen(0))
    assert tube.sum(dim=1).tolist() == [round(ratio * S) * 8] * 4
    per_slice = tube.view(4, 8, S)
    assert bool((per_slice == per_slice[:, :1]).all()), "a tube mask is constant over time"
    assert torch.equal(random_mask(4, grid, ratio, gen(0)), rnd)


def test_make_mask_follows_the_config():
    grid = (8, 4, 4)
    assert make_mask(MaskingConfig(kind="none"), 2, grid) is None
    assert make_mask(MaskingConfig(ratio=0.0), 2, grid) is None
    cfg = MaskingConfig(ratio=0.75, eval_ratio=0.5)
    assert make_mask(cfg, 2, grid, gen(0), train=True).sum(1).tolist() == [96, 96]
    ev = make_mask(cfg, 2, grid, gen(0), train=False)
    assert torch.equal(ev, cell_running_mask(2, grid, 0.5, train=False))
    assert make_mask(MaskingConfig(kind="tube", ratio=0.5), 2, grid, gen(0)).sum(1).tolist() == [64, 64]


@pytest.mark.parametrize(
    "mask",
    [
        cell_running_mask(3, (4, 4, 6), 0.5, gen(0)),
        cell_running_mask(3, (4, 4, 6), 0.75, gen(1), per_cell_phase=True),
        random_mask(3, (4, 4, 6), 0.3, gen(2)),
    ],
)
def test_a_mask_packs_into_a_uniform_layout_and_its_complement(mask):
    packed = pack_mask(mask)
    N = mask.shape[1]
    n_mask = int(mask[0].sum())
    assert packed.uniform and packed.lengths == (N - n_mask,) * 3 and packed.num_masked == 3 * n_mask
    vis, msk = packed.visible_idx.view(3, -1), packed.masked_idx.view(3, -1)
    for b in range(3):
        v, m = vis[b].tolist(), msk[b].tolist()
        assert v == torch.nonzero(~mask[b]).flatten().tolist()  # ascending
        assert m == torch.nonzero(mask[b]).flatten().tolist()
    other = pack_mask(~mask)  # evaluation's complementary pass
    assert torch.equal(other.visible_idx, packed.masked_idx) and torch.equal(other.masked_idx, packed.visible_idx)
    full = PackedTokens.full(3, N)
    assert full.uniform and full.num_masked == 0 and torch.equal(full.flat_visible, torch.arange(3 * N))


def test_shuffle_time_slices_permutes_whole_slices_per_clip():
    grid = (8, 4, 4)
    # The same random mask for all three clips: slices that differ from each other.
    base = random_mask(1, grid, 0.5, torch.Generator().manual_seed(0)).expand(3, -1).contiguous()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    shuffled = shuffle_time_slices(base, grid, generators)
    slices, before = shuffled.view(3, 8, 16), base.view(3, 8, 16)
    assert len({tuple(row.tolist()) for row in before[0]}) == 8
    for b in range(3):
        # every slice of the result is one of the original slices, each used once
        used = sorted(next(t for t in range(8) if torch.equal(slices[b, s], before[b, t])) for s in range(8))
        assert used == list(range(8))
    assert torch.equal(shuffled[0], shuffled[2])  # same seed, same permutation
    assert not torch.equal(shuffled[0], shuffled[1])
    assert torch.equal(shuffled.sum(1), base.sum(1))
    with pytest.raises(ValueError, match="3 masks but 2 generators"):
        shuffle_time_slices(base, grid, generators[:2])


def test_evaluation_options_need_a_mask():
    with pytest.raises(ValueError, match="masking.kind is none"):
        MaskingConfig(kind="none", eval_complement=True)
    assert MaskingConfig(eval_complement=True, eval_temporal_shuffle=True).eval_complement


def test_one_count_of_kept_tokens_for_masks_batches_and_cost():
    """Tube masking at 0.9 on the 8 x 14 x 14 grid: round(0.9 x 196) = 176 positions through
    8 slices keep 160 tokens, not N - round(0.9 N) = 157. Masks, batches and the cost
    counter use the one count (`visible_tokens`)."""
    from marscale.core.clip import ClipConfig
    from marscale.cost.counting import count_model
    from marscale.model import ModelConfig
    from marscale.tokens.batches import build_token_batches

    grid = (8, 14, 14)
    tube = MaskingConfig(kind="tube", ratio=0.9)
    assert visible_tokens("tube", grid, 0.9) == tube.visible(grid, 0.9) == 160
    assert (~make_mask(tube, 2, grid, gen(0))).sum(1).tolist() == [160, 160]
    batches = build_token_batches(tube, grid, seed=0, batch_size=2, token_budget=None, clips_per_video=1,
                                  pairs=False, grad_accum_steps=1)
    assert batches.visible == {0.9: 160} and batches.micro_batch(0, 0, 0).visible == (160, 160)
    model = ModelConfig(num_classes=10, variant="vit_tiny")
    assert count_model(model, ClipConfig(), 0.9, tube).visible_tokens == 160
    assert count_model(model, ClipConfig(), 0.9).visible_tokens == 1568 - 1411  # random: round(0.9 N) masked
    cell = MaskingConfig(kind="cell_running", ratio=0.75)
    assert cell.visible(grid, 0.75) == 392 == int((~make_mask(cell, 1, grid, gen(0))).sum())
