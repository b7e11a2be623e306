"""What each training micro-batch holds: how many clips, and the mask ratio of each.

A pure function of (seed, step, micro-batch, rank), so it needs no saved state and every
process can compute it for every other. A micro-batch is described once (`MicroBatch`: its
ratios, visible and masked tokens), drawn by `TokenBatches.micro_batch`: under a token
budget by the loader worker that cuts the batch (it carries the ratios in the batch as
"ratios"), otherwise by the training step. The step describes itself once (`StepBatches`:
every micro-batch of every rank, this rank's from its batches), and its totals, the
loss weights of each micro-batch and the work the metrics count all come from that.

Two ways to form a batch (`data.token_budget`):
- a clip count: `data.batch_size` clips, each drawing its ratio from the schedule;
- a token budget: clips are added, a group at a time, while what they weigh fits in the
  budget (at least one group; at most `data.batch_size` clips). A group is
  `data.clips_per_video` clips (the repeated augmentations of one video stay together),
  doubled when mixup/cutmix pairs clips and the count is odd. What a clip weighs
  (`data.budget_unit`):
  - "visible": its visible tokens. A batch of clips masked at 75% holds about three times
    as many clips as one at 25%: the encoder's tokens per step are about equal, but not
    the step's cost, since the decoder runs on every token of every clip (at the demo's
    shapes a 75%-masked clip costs 46% of a 25%-masked one, not 33%);
  - "cost": its counted training FLOPs (`marscale.cost.counting.training_flops_by_visible`).
    The budget is still written in tokens: those of the least-masked clip, whose FLOPs
    set the exchange rate (budget x its FLOPs / its visible tokens), so the same number
    holds the same clips of that ratio in both units. A batch then costs at most the
    budget and, unless it is full at `data.batch_size`, less than one group's cost below
    it (the group drawn next did not fit).

Every rank makes the same number of steps whatever its batch sizes, so the collectives
stay in step; the epoch is counted in loader batches as before (`marscale.engine.plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import torch

from marscale.core.seeding import derive_seed
from marscale.data.config import BudgetUnit
from marscale.tokens.masking import MaskingConfig, RatioSchedule, make_mask
from marscale.tokens.packing import PackedTokens, pack_mask

_RATIO_STREAM = 0x7261  # keeps the ratio draws apart from the mask draws (seed, step, micro, rank)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's clips: their mask ratios (ascending) and tokens, described once."""

    ratios: tuple[float, ...]
    visible: tuple[int, ...]
    """Visible tokens of each clip."""
    tokens_per_clip: int

    @property
    def clips(self) -> int:
        return len(self.ratios)

    @property
    def visible_total(self) -> int:
        return sum(self.visible)

    @property
    def masked_total(self) -> int:
        return self.clips * self.tokens_per_clip - self.visible_total


@dataclasses.dataclass(frozen=True)
class StepBatches:
    """Every micro-batch of one optimizer step on every rank: `by_rank[rank][micro]`."""

    by_rank: tuple[tuple[MicroBatch, ...], ...]

    @functools.cached_property
    def totals(self) -> tuple[int, int, int]:
        """(clips, visible tokens, masked tokens) of the whole step."""
        mbs = [mb for micro in self.by_rank for mb in micro]
        return (sum(mb.clips for mb in mbs), sum(mb.visible_total for mb in mbs), sum(mb.masked_total for mb in mbs))

    def work(self, flops_by_visible: dict[int, int]) -> tuple[int, int, int]:
        """(clips, visible tokens, FLOPs) of the whole step, a clip's FLOPs looked up by its
        visible tokens (the run plan's `flops_by_visible`): the work the metrics count."""
        per_batch: dict[int, int] = {}  # alike micro-batches are one object: sum each once
        flops = 0
        for micro in self.by_rank:
            for mb in micro:
                if id(mb) not in per_batch:
                    per_batch[id(mb)] = sum(flops_by_visible[v] for v in mb.visible)
                flops += per_batch[id(mb)]
        clips, visible, _ = self.totals
        return clips, visible, flops

    def scales(self, rank: int, micro: int) -> tuple[float, float]:
        """(classification, reconstruction) loss scales of one micro-batch (`loss_scales`)."""
        mb = self.by_rank[rank][micro]
        clips, _, masked = self.totals
        return loss_scales((mb.clips, mb.masked_total), (clips, masked), len(self.by_rank), len(self.by_rank[rank]))


@dataclasses.dataclass(frozen=True)
class TokenBatches:
    masking: MaskingConfig
    grid: tuple[int, int, int]
    schedule: RatioSchedule
    visible: dict[float, int]
    """Visible tokens of a clip masked at each ratio the schedule can draw."""
    tokens_per_clip: int
    seed: int
    batch_size: int
    """Clips per micro-batch; with a token budget, the most a micro-batch holds."""
    token_budget: int | None
    """`data.token_budget` as written (tokens)."""
    budget_unit: BudgetUnit
    """`data.budget_unit`: "visible" or "cost" (see the module docstring)."""
    weight: dict[float, int]
    """What a clip masked at each ratio weighs against `capacity`: its visible tokens
    ("visible") or its counted training FLOPs ("cost")."""
    capacity: int | None
    """The token budget in `weight`'s unit: `token_budget` visible tokens, or the FLOPs of
    `token_budget` visible tokens of least-masked clips (rounded down: a whole number of
    weights fits in it exactly when it fits in the exact value)."""
    group: int
    """Clips added together (see the module docstring)."""
    grad_accum_steps: int

    @property
    def varies(self) -> bool:
        """True when clips of one batch can keep different numbers of tokens."""
        return self.schedule.fixed is None

    def ratios(self, step: int, micro: int, rank: int) -> tuple[float, ...]:
        """Draw the mask ratio of each clip of micro-batch `micro` of optimizer `step` on
        `rank`, in ascending order: clips of equal length sit together, so packed attention
        runs one call per distinct ratio (`PackedTokens.runs`). Which clip gets which ratio
        is as random as before: the loader's clips come in shuffled order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _RATIO_STREAM, step, micro, rank))
        if self.token_budget is None:
            return tuple(sorted(self.schedule.draw(step, self.batch_size, g)))
        out: list[float] = []
        used = 0
        while len(out) + self.group <= self.batch_size:
            drawn = self.schedule.draw(step, self.group, g)
            cost = sum(self.weight[r] for r in drawn)
            if out and used + cost > self.capacity:
                break
            out += drawn
            used += cost
        return tuple(sorted(out))

    def describe(self, ratios) -> MicroBatch:
        """The micro-batch of clips masked at `ratios`."""
        ratios = tuple(float(r) for r in ratios)
        return MicroBatch(ratios, tuple(self.visible[r] for r in ratios), self.tokens_per_clip)

    def micro_batch(self, step: int, micro: int, rank: int) -> MicroBatch:
        """Micro-batch `micro` of optimizer `step` on `rank`, drawn (`ratios`); the same one
        for every micro-batch when clips neither vary nor fill a budget."""
        if self.schedule.fixed is not None and self.token_budget is None:
            return self._fixed
        return self.describe(self.ratios(step, micro, rank))

    @functools.cached_property
    def _fixed(self) -> MicroBatch:
        return self.describe((self.schedule.fixed,) * self.batch_size)

    def step_batches(self, step: int, world_size: int, rank: int = 0, mine=None) -> StepBatches:
        """Every micro-batch of optimizer `step`. `mine`: this `rank`'s micro-batches when
        they are already known (the ratios its loader carried), so they are not drawn again."""
        return StepBatches(tuple(
            tuple(mine) if r == rank and mine is not None
            else tuple(self.micro_batch(step, m, r) for m in range(self.grad_accum_steps))
            for r in range(world_size)
        ))

    def tokens(self, batch: MicroBatch, step: int, micro: int, rank: int) -> PackedTokens | None:
        """The token layout of a training micro-batch (host), masked from a generator seeded
        by (run seed, step, micro, rank); None when every token is visible."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, step, micro, rank))
        ratios = list(batch.ratios) if self.varies else None
        mask = make_mask(self.masking, batch.clips, self.grid, generator, train=True, ratios=ratios)
        return None if mask is None else pack_mask(mask)

    def mean_clips_per_batch(self, samples: int = 64) -> float:
        """Mean clips per micro-batch over the first `samples` micro-batches of rank 0 (the
        plan's epoch length with a token budget; fixed counts give batch_size exactly)."""
        if self.token_budget is None:
            return float(self.batch_size)
        sizes = [len(self.ratios(i // self.grad_accum_steps, i % self.grad_accum_steps, 0)) for i in range(samples)]
        return sum(sizes) / len(sizes)


def loss_scales(local: tuple[int, int], step_total: tuple[int, int], world_size: int, grad_accum_steps: int):
    """(cls_scale, recon_scale) for one micro-batch holding `local` = (clips, masked tokens)
    of a step holding `step_total` over all ranks and micro-batches.

    DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps,
    so a micro-batch's mean loss is scaled by (its share of the step) x world x accumulation:
    the step's gradient is then that of the classification mean over all its clips plus the
    reconstruction mean over all its masked tokens. Equal batches give (1.0, 1.0) exactly.
    """
    factor = world_size * grad_accum_steps
    scales = []
    for mine, total in zip(local, step_total):
        scales.append(1.0 if mine * factor == total or total == 0 else mine * factor / total)
    return tuple(scales)


def budget_weights(
    visible: dict[float, int], token_budget: int | None, budget_unit: BudgetUnit, clip_flops=None
) -> tuple[dict[float, int], int | None]:
    """(weight of a clip masked at each ratio, capacity) of a token budget in `budget_unit`
    (see `TokenBatches.weight` and `.capacity`). `visible`: visible tokens by ratio;
    `clip_flops`: visible-token counts -> {count: training FLOPs of one clip} (needed for
    "cost")."""
    if budget_unit not in typing.get_args(BudgetUnit):
        raise ValueError(f"data.budget_unit must be one of {typing.get_args(BudgetUnit)}, got {budget_unit!r}")
    if budget_unit == "visible":
        return dict(visible), token_budget
    if clip_flops is None:
        raise ValueError("a cost budget needs the clips' counted FLOPs (clip_flops)")
    flops = clip_flops(sorted(set(visible.values())))
    weight = {r: flops[v] for r, v in visible.items()}
    top = max(visible.values())  # the least-masked clip sets the exchange rate
    capacity = None if token_budget is None else token_budget * flops[top] // top
    return weight, capacity


def build_token_batches(
    masking: MaskingConfig,
    grid: tuple[int, int, int],
    *,
    seed: int,
    batch_size: int,
    token_budget: int | None,
    clips_per_video: int,
    pairs: bool,
    grad_accum_steps: int,
    budget_unit: BudgetUnit = "visible",
    clip_flops=None,
) -> TokenBatches:
    """The batches of a run. `pairs`: mixup/cutmix is on (batches must be even).
    `budget_unit` and `clip_flops`: as `budget_weights` takes them."""
    schedule = masking.schedule(grid)
    values = sorted({r for _, stage in schedule.stages for r in stage})
    n = grid[0] * grid[1] * grid[2]
    visible = {r: masking.visible(grid, r) for r in values}
    group = clips_per_video * (2 if pairs and clips_per_video % 2 else 1)
    weight, capacity = budget_weights(visible, token_budget, budget_unit, clip_flops)
    if token_budget is not None:
        largest = max(weight.values()) * group
        if capacity < largest:
            raise ValueError(_too_small(token_budget, budget_unit, group, visible, weight))
        if batch_size % group:
            raise ValueError(f"data.batch_size {batch_size} must be a multiple of {group} with a token budget")
    return TokenBatches(
        masking=masking, grid=grid, schedule=schedule, visible=visible, tokens_per_clip=n, seed=seed, batch_size=batch_size,
        token_budget=token_budget, budget_unit=budget_unit, weight=weight, capacity=capacity, group=group,
        grad_accum_steps=grad_accum_steps,
    )


def _too_small(token_budget: int, budget_unit: BudgetUnit, group: int, visible: dict[float, int], weight: dict[float, int]):
    """Why `token_budget` cannot hold one group of the heaviest clips, and the least that can."""
    heaviest = max(weight, key=lambda r: (weight[r], -r))
    if budget_unit == "visible":
        least = weight[heaviest] * group
        return (f"data.token_budget {token_budget} cannot hold one group of {group} clips at the lowest mask "
                f"ratio ({least} visible tokens); raise it to at least {least}")
    top = max(visible.values())
    reference = weight[max(visible, key=visible.get)]
    least = -(-weight[heaviest] * group * top // reference)  # ceil: the least budget whose capacity holds it
    return (f"data.token_budget {token_budget} (budget_unit cost) cannot hold one group of {group} clips at mask "
            f"ratio {heaviest} ({group * weight[heaviest] / 1e9:.3g} GFLOP, {least} tokens of the least-masked "
            f"clip); raise it to at least {least}")
