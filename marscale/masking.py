"""Token masks for MAR: cell running masking, and random / tube masking as baselines.

Pure functions over shapes and an explicit `torch.Generator`, so a seed reproduces every
mask. Token n sits at grid position (t, y, x) with n = (t*H' + y)*W' + x (the encoder's
order). A mask is bool [B, N]: True = masked (removed), False = visible, as in MAE.

Cell running masking (MAR): the H' x W' grid is cut into ch x cw cells (2x2 by default)
whose K = ch*cw slots are numbered row-major. With m = ratio*K masked slots, the base
pattern is m masked slots followed by K-m visible ones; at time slice t it is rotated by
t mod K, so the visible slots "run" through the cell and every slot is seen within K
consecutive slices. Training draws a phase per clip (optionally per cell) and then
shuffles the time slices per clip; evaluation uses phase 0 and no shuffle.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from marscale.choices import check_choices


@dataclasses.dataclass
class MaskingConfig:
    """How the encoder's visible tokens are chosen. The `masking:` section of a config."""

    kind: Literal["cell_running", "random", "tube", "none"] = "cell_running"
    """cell_running (MAR), random, tube, or none (all tokens visible: the ViT baseline)."""
    ratio: float = 0.5
    """Share of tokens masked; for cell_running ratio x cell slots must be a whole number."""
    cell: tuple[int, int] = (2, 2)
    """Cell size (height, width) in tokens for cell_running."""
    per_cell_phase: bool = False
    """Training: draw the running phase per cell instead of once per clip."""
    temporal_shuffle: bool = True
    """Training: permute the time slices of the mask per clip."""
    eval_ratio: float | None = None
    """Masking ratio at evaluation (None: same as `ratio`)."""
    eval_complement: bool = False
    """Evaluation: also score each view with the complementary mask (the masked tokens
    visible) and average the two passes' logits, as the MAR reference's `MASK_INV_TEST`;
    together the two passes see every token. Costs a second encoder pass per view: 2x
    the evaluation compute at 50%, and at 75% the complement shows 75% of the tokens
    (4x the masked pass). Off by default."""
    eval_temporal_shuffle: bool = False
    """Evaluation: permute the time slices of the evaluation mask per view (the reference's
    test-time temporal shuffle), from a generator seeded by (video index, view), so a
    video's score does not depend on batching, ranks or workers. No extra compute. Off by
    default (one fixed pattern)."""

    def __post_init__(self):
        check_choices(self)
        self.cell = tuple(self.cell)
        if self.kind != "none":
            for r in (self.ratio, self.eval_ratio):
                if r is not None and not 0.0 <= r < 1.0:
                    raise ValueError(f"masking ratio must be in [0, 1), got {r}")
        if self.kind == "cell_running":
            for r in (self.ratio, self.eval_ratio):
                if r is not None:
                    masked_per_cell(r, self.cell[0] * self.cell[1])
        if self.kind == "none" and (self.eval_complement or self.eval_temporal_shuffle):
            raise ValueError(
                "masking.eval_complement and masking.eval_temporal_shuffle change the evaluation mask, "
                "but masking.kind is none (every token visible); switch them off"
            )

    def ratio_at(self, train: bool = True) -> float:
        """Share of tokens masked in training (train=True) or evaluation; 0 when masking is off."""
        if self.kind == "none":
            return 0.0
        return self.ratio if (train or self.eval_ratio is None) else self.eval_ratio


def masked_per_cell(ratio: float, slots: int) -> int:
    m = ratio * slots
    if abs(m - round(m)) > 1e-6 or not 0 <= round(m) < slots:
        raise ValueError(
            f"cell running masking needs ratio x {slots} slots per cell to be a whole number below "
            f"{slots} (e.g. 0.25, 0.5, 0.75 for 2x2 cells); got ratio {ratio}"
        )
    return int(round(m))


def cell_running_mask(
    batch: int,
    grid: tuple[int, int, int],
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    train: bool = True,
    cell: tuple[int, int] = (2, 2),
    per_cell_phase: bool = False,
    temporal_shuffle: bool = True,
) -> torch.Tensor:
    """Cell running mask, bool [batch, T'*H'*W'] (True = masked)."""
    T, H, W = grid
    ch, cw = cell
    if H % ch or W % cw:
        raise ValueError(f"token grid {H}x{W} is not divisible by the {ch}x{cw} cell")
    K = ch * cw
    m = masked_per_cell(ratio, K)
    nh, nw = H // ch, W // cw
    base = torch.arange(K) < m  # [K]: m masked slots, then visible ones
    if train:
        phase_shape = (batch, 1, nh * nw, 1) if per_cell_phase else (batch, 1, 1, 1)
        phase = torch.randint(0, K, phase_shape, generator=generator)
    else:
        phase = torch.zeros((batch, 1, 1, 1), dtype=torch.long)
    t = torch.arange(T).view(1, T, 1, 1)
    slot = torch.arange(K).view(1, 1, 1, K)
    # Slot i at slice t shows base[(i - t - phase) mod K]: the pattern rotates by one per slice.
    masked = base[(slot - t - phase) % K].expand(batch, T, nh * nw, K)  # [B, T', cells, K]
    if train and temporal_shuffle:
        perm = torch.argsort(torch.rand(batch, T, generator=generator), dim=1)
        masked = masked.gather(1, perm.view(batch, T, 1, 1).expand(-1, -1, nh * nw, K))
    # (cell row, cell col, slot row, slot col) -> (y, x)
    masked = masked.reshape(batch, T, nh, nw, ch, cw).permute(0, 1, 2, 4, 3, 5)
    return masked.reshape(batch, T * H * W).contiguous()


def random_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random tokens masked, the same count in every clip: bool [B, N]."""
    N = grid[0] * grid[1] * grid[2]
    n_mask = int(round(ratio * N))
    rank = torch.argsort(torch.rand(batch, N, generator=generator), dim=1).argsort(dim=1)
    return rank < n_mask


def tube_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random spatial positions masked through all time slices (VideoMAE tubes): bool [B, N]."""
    T, H, W = grid
    spatial = random_mask(batch, (1, H, W), ratio, generator)  # [B, H'*W']
    return spatial.unsqueeze(1).expand(batch, T, H * W).reshape(batch, T * H * W)


def make_mask(
    cfg: MaskingConfig,
    batch: int,
    grid: tuple[int, int, int],
    generator: torch.Generator | None = None,
    train: bool = True,
) -> torch.Tensor | None:
    """The mask `cfg` asks for, or None when every token is visible."""
    ratio = cfg.ratio_at(train)
    if ratio == 0:
        return None
    if cfg.kind == "cell_running":
        return cell_running_mask(
            batch,
            grid,
            ratio,
            generator,
            train=train,
            cell=cfg.cell,
            per_cell_phase=cfg.per_cell_phase,
            temporal_shuffle=cfg.temporal_shuffle,
        )
    if cfg.kind == "random":
        return random_mask(batch, grid, ratio, generator)
    return tube_mask(batch, grid, ratio, generator)


def shuffle_time_slices(
    mask: torch.Tensor, grid: tuple[int, int, int], generators: list[torch.Generator]
) -> torch.Tensor:
    """Permute the T' time slices of each clip's mask, clip b with `generators[b]`:
    bool [B, N] -> bool [B, N], the same number of masked tokens per clip."""
    T, H, W = grid
    if len(generators) != mask.shape[0]:
        raise ValueError(f"{mask.shape[0]} masks but {len(generators)} generators")
    perm = torch.stack([torch.randperm(T, generator=g) for g in generators])  # [B, T']
    slices = mask.view(mask.shape[0], T, H * W)
    return slices.gather(1, perm.unsqueeze(-1).expand(-1, -1, H * W)).reshape(mask.shape)


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, N] -> (visible_idx [B, Nv], masked_idx [B, Nm]), each ascending.

    Every clip must mask the same number of tokens (true for all masks above), so the
    encoder batch stays rectangular.
    """
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every clip in a batch must mask the same number of tokens")
    n_mask = int(counts[0])
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    n_vis = mask.shape[1] - n_mask
    return order[:, :n_vis], order[:, n_vis:]
