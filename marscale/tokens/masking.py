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

Per-clip ratios: `masking.ratio` is one value, a set drawn per clip, a range, or a schedule
of those over training steps (`RatioSchedule`). Every ratio (fixed, drawn or for
evaluation) gives a whole number of masked units: cell slots for cell running, tokens for
random masking, spatial positions for tube masking (`check_whole_units`, when the config
is read; `masked_tokens` is the one count). The masks then hold different numbers of
visible tokens per clip (`marscale.tokens.packing.pack_mask` lays them out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from marscale.core.choices import check_choices


@dataclasses.dataclass
class MaskingConfig:
    """How the encoder's visible tokens are chosen. The `masking:` section of a config."""

    kind: Literal["cell_running", "random", "tube", "none"] = "cell_running"
    """cell_running (MAR), random, tube, or none (all tokens visible: the ViT baseline)."""
    ratio: float | list[float] | dict[str, Any] = 0.5
    """Share of tokens masked in training: one value (`0.5`); a set drawn uniformly per
    clip (`[0.25, 0.5, 0.75]`); a range drawn uniformly per clip over the whole numbers of
    masked units it holds (`{min: 0.25, max: 0.75}`: for 2x2 cells 0.25, 0.5 or 0.75); or a
    schedule over optimizer steps whose stages are any of those
    (`{schedule: [{from_step: 0, ratio: 0.25}, {from_step: 1000, ratio: [0.5, 0.75]}]}`).
    For cell_running every drawn ratio x cell slots must be a whole number (checked here)."""
    cell: tuple[int, int] = (2, 2)
    """Cell size (height, width) in tokens for cell_running."""
    per_cell_phase: bool = False
    """Training: draw the running phase per cell instead of once per clip."""
    temporal_shuffle: bool = True
    """Training: permute the time slices of the mask per clip."""
    eval_ratio: float | None = None
    """Masking ratio at evaluation (None: same as `ratio`, which must then be one value)."""
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
        if isinstance(self.ratio, int) and not isinstance(self.ratio, bool):
            self.ratio = float(self.ratio)
        if self.kind != "none":
            self.schedule()  # every drawn ratio valid for this kind of mask
            if self.eval_ratio is not None:
                check_ratio(self.eval_ratio, self.kind, self.cell)
            elif not isinstance(self.ratio, float):
                raise ValueError(
                    f"masking.ratio {self.ratio!r} draws several ratios: set masking.eval_ratio to the one "
                    f"evaluation uses (e.g. 0.5), or evaluate at several with `marscale eval --mask-ratios`"
                )
        if self.kind == "none" and (self.eval_complement or self.eval_temporal_shuffle):
            raise ValueError(
                "masking.eval_complement and masking.eval_temporal_shuffle change the evaluation mask, "
                "but masking.kind is none (every token visible); switch them off"
            )

    def schedule(self, grid: tuple[int, int, int] | None = None) -> "RatioSchedule":
        """The training ratios as a schedule of finite sets (a fixed ratio: one stage of one
        value). A range becomes the ratios of whole masked units in it; for random and tube
        masking that needs the token `grid` (without it a range is only checked)."""
        if self.kind == "none":
            return RatioSchedule(((0, (0.0,)),))
        return parse_ratio(self.ratio, self.kind, self.cell, grid)

    def visible(self, grid: tuple[int, int, int], ratio: float) -> int:
        """Tokens a clip keeps under this masking at `ratio` (`visible_tokens`)."""
        return visible_tokens(self.kind, grid, ratio, self.cell)

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        """Every ratio training can draw, and the evaluation ratio, masks whole units of `grid`
        (an error naming the nearest whole ratios otherwise)."""
        if self.kind == "none":
            return
        for _, values in self.schedule(grid).stages:
            for r in values:
                check_whole_units(self.kind, grid, r, self.cell, "masking.ratio")
        if self.eval_ratio is not None:
            check_whole_units(self.kind, grid, self.eval_ratio, self.cell, "masking.eval_ratio")

    @property
    def per_clip(self) -> bool:
        """True when training draws a ratio per clip (clips then differ in visible tokens)."""
        return self.kind != "none" and not isinstance(self.ratio, float)

    def ratio_at(self, train: bool = True) -> float:
        """Share of tokens masked in training (train=True) or evaluation; 0 when masking is off.
        With per-clip ratios, the training value is the mean ratio drawn over the schedule's
        stages (a summary for cost tables; the run plan counts the exact mix)."""
        if self.kind == "none":
            return 0.0
        if not train and self.eval_ratio is not None:
            return self.eval_ratio
        if isinstance(self.ratio, float):
            return self.ratio
        stages = self.schedule().stages
        return sum(sum(v) / len(v) for _, v in stages) / len(stages)


@dataclasses.dataclass(frozen=True)
class RatioSchedule:
    """Training mask ratios: stages (first optimizer step, ratios drawn uniformly per clip),
    ordered by step, the first at step 0."""

    stages: tuple[tuple[int, tuple[float, ...]], ...]

    def at(self, step: int) -> tuple[float, ...]:
        """The ratios clips may draw at optimizer `step`."""
        current = self.stages[0][1]
        for start, values in self.stages:
            if step < start:
                break
            current = values
        return current

    @property
    def fixed(self) -> float | None:
        """The one ratio of a schedule that never varies, else None."""
        return self.stages[0][1][0] if len(self.stages) == 1 and len(self.stages[0][1]) == 1 else None

    def draw(self, step: int, n: int, generator: torch.Generator) -> list[float]:
        """n ratios for clips of optimizer `step`, uniform over the stage's set."""
        values = self.at(step)
        if len(values) == 1:
            return [values[0]] * n
        return [values[i] for i in torch.randint(len(values), (n,), generator=generator).tolist()]

    def mean_over(self, total_steps: int, f) -> float:
        """Mean of f(ratio) over the clips of a run of `total_steps` steps (stages weighted by
        their steps, ratios within a stage equally)."""
        total = 0.0
        starts = [s for s, _ in self.stages] + [max(total_steps, self.stages[-1][0])]
        for (start, values), end in zip(self.stages, starts[1:]):
            steps = max(0, min(end, total_steps) - start)
            total += steps * sum(f(r) for r in values) / len(values)
        return total / total_steps if total_steps else sum(f(r) for r in self.stages[0][1]) / len(self.stages[0][1])


def mask_units(kind: str, cell: tuple[int, int], grid: tuple[int, int, int] | None) -> int | None:
    """How many units a ratio counts whole ones of: cell slots (cell_running), tokens
    (random), spatial positions (tube); None where the grid is needed but not given."""
    if kind == "cell_running":
        return cell[0] * cell[1]
    if grid is None:
        return None
    return grid[0] * grid[1] * grid[2] if kind == "random" else grid[1] * grid[2]


def masked_tokens(kind: str, grid: tuple[int, int, int], ratio: float, cell: tuple[int, int] = (2, 2)) -> int:
    """How many of a clip's T'*H'*W' tokens `kind` masking masks at `ratio`: the one rule,
    used by the masks themselves, the run plan, the cost counter and the evaluation dial.

    cell running: ratio x slots per cell (whole, else an error) in every cell of every slice;
    random: round(ratio x N) tokens; tube: round(ratio x H'*W') positions through all T'
    slices. Configs may only name ratios that mask whole units (`check_whole_units`).
    """
    T, H, W = grid
    if kind == "none" or ratio == 0:
        return 0
    if kind == "cell_running":
        slots = cell[0] * cell[1]
        return T * (H * W // slots) * masked_per_cell(ratio, slots)
    if kind == "random":
        return int(round(ratio * T * H * W))
    return T * int(round(ratio * H * W))


def visible_tokens(kind: str, grid: tuple[int, int, int], ratio: float, cell: tuple[int, int] = (2, 2)) -> int:
    """Tokens a clip keeps: N - `masked_tokens`."""
    return grid[0] * grid[1] * grid[2] - masked_tokens(kind, grid, ratio, cell)


def check_whole_units(kind: str, grid: tuple[int, int, int], ratio: float, cell: tuple[int, int], where: str) -> None:
    """Refuse a ratio that masks part of a unit (a token for random, a spatial position for
    tube; cell slots are checked by `masked_per_cell`), naming the nearest whole ratios."""
    units = mask_units(kind, cell, grid)
    if kind not in ("random", "tube") or units is None:
        return
    exact = ratio * units
    if abs(exact - round(exact)) > 1e-6:
        low, high = math.floor(exact), math.ceil(exact)
        name = "tokens" if kind == "random" else "spatial positions"
        raise ValueError(
            f"{where} {ratio} masks {exact:.4g} of the {units} {name} of {kind} masking, not a whole number; "
            f"use {low / units:.6g} ({low}) or {high / units:.6g} ({high})"
        )


def check_ratio(ratio: float, kind: str, cell: tuple[int, int]) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"masking ratio must be a number in [0, 1), got {ratio!r}")
    if kind == "cell_running":
        masked_per_cell(ratio, cell[0] * cell[1])
    return float(ratio)


def _parse_values(value: Any, kind: str, cell: tuple[int, int], grid, where: str) -> tuple[float, ...]:
    """One stage: a number, a list of numbers or a {min, max} range -> sorted distinct ratios."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (check_ratio(value, kind, cell),)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: the set of ratios is empty")
        return tuple(sorted({check_ratio(v, kind, cell) for v in value}))
    if isinstance(value, dict) and set(value) == {"min", "max"}:
        low, high = (check_ratio(value[k], "random", cell) for k in ("min", "max"))
        if low > high:
            raise ValueError(f"{where}: range min {low} is above max {high}")
        units = mask_units(kind, cell, grid)
        if units is None:
            return (low, high)  # checked again with the grid when the run is planned
        counts = range(math.ceil(low * units - 1e-9), math.floor(high * units + 1e-9) + 1)
        values = tuple(c / units for c in counts if c < units)
        if not values:
            raise ValueError(
                f"{where}: no ratio in [{low}, {high}] masks a whole number of the {units} "
                f"{'cell slots' if kind == 'cell_running' else 'units'}; widen the range"
            )
        return values
    raise ValueError(
        f"{where}: expected a ratio (0.5), a set ([0.25, 0.5, 0.75]), a range ({{min: 0.25, max: 0.75}}) "
        f"or a schedule ({{schedule: [{{from_step: 0, ratio: ...}}, ...]}}), got {value!r}"
    )


def parse_ratio(
    value: Any, kind: str, cell: tuple[int, int], grid: tuple[int, int, int] | None = None
) -> RatioSchedule:
    """`masking.ratio` (any of its forms) -> RatioSchedule, with errors that name the problem."""
    if isinstance(value, dict) and "schedule" in value:
        if set(value) != {"schedule"} or not isinstance(value["schedule"], list) or not value["schedule"]:
            raise ValueError(
                f"masking.ratio: a schedule is {{schedule: [{{from_step: 0, ratio: ...}}, ...]}}, got {value!r}"
            )
        stages = []
        for i, stage in enumerate(value["schedule"]):
            where = f"masking.ratio.schedule[{i}]"
            if not isinstance(stage, dict) or set(stage) != {"from_step", "ratio"}:
                raise ValueError(f"{where}: expected {{from_step: N, ratio: ...}}, got {stage!r}")
            start = stage["from_step"]
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"{where}.from_step must be a whole number >= 0, got {start!r}")
            if stages and start <= stages[-1][0]:
                raise ValueError(f"{where}.from_step {start} must come after the previous stage's {stages[-1][0]}")
            stages.append((start, _parse_values(stage["ratio"], kind, cell, grid, where)))
        if stages[0][0] != 0:
            raise ValueError(f"masking.ratio.schedule must start at from_step 0, not {stages[0][0]}")
        return RatioSchedule(tuple(stages))
    return RatioSchedule(((0, _parse_values(value, kind, cell, grid, "masking.ratio")),))


def masked_per_cell(ratio: float, slots: int) -> int:
    m = ratio * slots
    if abs(m - round(m)) > 1e-6 or not 0 <= round(m) < slots:
        raise ValueError(
            f"cell running masking needs ratio x {slots} slots per cell to be a whole number below "
            f"{slots} (e.g. 0.25, 0.5, 0.75 for 2x2 cells); got ratio {ratio}"
        )
    return int(round(m))


def _per_clip(ratio: float | list[float], batch: int) -> list[float]:
    ratios = [float(ratio)] * batch if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != batch:
        raise ValueError(f"{len(ratios)} mask ratios for a batch of {batch} clips")
    return ratios


def cell_running_mask(
    batch: int,
    grid: tuple[int, int, int],
    ratio: float | list[float],
    generator: torch.Generator | None = None,
    *,
    train: bool = True,
    cell: tuple[int, int] = (2, 2),
    per_cell_phase: bool = False,
    temporal_shuffle: bool = True,
) -> torch.Tensor:
    """Cell running mask, bool [batch, T'*H'*W'] (True = masked). `ratio`: one for every
    clip, or one per clip (the draws from `generator` do not depend on it)."""
    T, H, W = grid
    ch, cw = cell
    if H % ch or W % cw:
        raise ValueError(f"token grid {H}x{W} is not divisible by the {ch}x{cw} cell")
    K = ch * cw
    m = torch.tensor([masked_per_cell(r, K) for r in _per_clip(ratio, batch)])  # [B]
    nh, nw = H // ch, W // cw
    base = torch.arange(K).unsqueeze(0) < m.unsqueeze(1)  # [B, K]: m masked slots, then visible ones
    if train:
        phase_shape = (batch, 1, nh * nw, 1) if per_cell_phase else (batch, 1, 1, 1)
        phase = torch.randint(0, K, phase_shape, generator=generator)
    else:
        phase = torch.zeros((batch, 1, 1, 1), dtype=torch.long)
    t = torch.arange(T).view(1, T, 1, 1)
    slot = torch.arange(K).view(1, 1, 1, K)
    # Slot i at slice t shows base[(i - t - phase) mod K]: the pattern rotates by one per slice.
    index = ((slot - t - phase) % K).expand(batch, T, nh * nw, K)
    masked = base.view(batch, 1, 1, K).expand(batch, T, nh * nw, K).gather(3, index)  # [B, T', cells, K]
    if train and temporal_shuffle:
        perm = torch.argsort(torch.rand(batch, T, generator=generator), dim=1)
        masked = masked.gather(1, perm.view(batch, T, 1, 1).expand(-1, -1, nh * nw, K))
    # (cell row, cell col, slot row, slot col) -> (y, x)
    masked = masked.reshape(batch, T, nh, nw, ch, cw).permute(0, 1, 2, 4, 3, 5)
    return masked.reshape(batch, T * H * W).contiguous()


def random_mask(
    batch: int, grid: tuple[int, int, int], ratio: float | list[float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random tokens masked, round(ratio x N) per clip: bool [B, N]."""
    N = grid[0] * grid[1] * grid[2]
    n_mask = torch.tensor([masked_tokens("random", grid, r) for r in _per_clip(ratio, batch)])
    rank = torch.argsort(torch.rand(batch, N, generator=generator), dim=1).argsort(dim=1)
    return rank < n_mask.unsqueeze(1)


def tube_mask(
    batch: int, grid: tuple[int, int, int], ratio: float | list[float], generator: torch.Generator | None = None
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
    ratios: list[float] | None = None,
) -> torch.Tensor | None:
    """The mask `cfg` asks for, or None when every token is visible. `ratios`: one per
    clip (drawn with `RatioSchedule.draw`), instead of the config's single ratio."""
    ratio = cfg.ratio_at(train) if ratios is None else ratios
    if ratios is None and ratio == 0:
        return None
    if cfg.kind == "none":
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
