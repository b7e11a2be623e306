"""What each training micro-batch holds: how many clips, and the mask ratio of each.

A pure function of (seed, step, micro-batch, rank), so it needs no saved state and every
process can compute it for every other: the loader uses it to cut batches of the right
size, the trainer to draw the masks, and both ranks to weigh their losses by the whole
step's clips and masked tokens (no collective).

Two ways to form a batch (`data.token_budget`):
- a clip count: `data.batch_size` clips, each drawing its ratio from the schedule;
- a token budget: clips are added, a group at a time, while the visible tokens fit in the
  budget (at least one group; at most `data.batch_size` clips). A batch of clips masked
  at 75% then holds about three times as many clips as one at 25%, and every step costs
  about the same. A group is `data.clips_per_video` clips (the repeated augmentations of
  one video stay together), doubled when mixup/cutmix pairs clips and the count is odd.

Every rank makes the same number of steps whatever its batch sizes, so the collectives
stay in step; the epoch is counted in loader batches as before (`marscale.engine.plan`).
"""

from __future__ import annotations

import dataclasses

import torch

from marscale.tokens.masking import MaskingConfig, RatioSchedule, make_mask
from marscale.core.seeding import derive_seed

_RATIO_STREAM = 0x7261  # keeps the ratio draws apart from the mask draws (seed, step, micro, rank)


@dataclasses.dataclass(frozen=True)
class TokenBatches:
    schedule: RatioSchedule
    visible: dict[float, int]
    """Visible tokens of a clip masked at each ratio the schedule can draw."""
    tokens_per_clip: int
    seed: int
    batch_size: int
    """Clips per micro-batch; with a token budget, the most a micro-batch holds."""
    token_budget: int | None
    group: int
    """Clips added together (see the module docstring)."""
    grad_accum_steps: int
    steps_per_epoch: int

    @property
    def varies(self) -> bool:
        """True when clips of one batch can keep different numbers of tokens (packed batches)."""
        return self.schedule.fixed is None

    def ratios(self, step: int, micro: int, rank: int) -> tuple[float, ...]:
        """The mask ratio of each clip of micro-batch `micro` of optimizer `step` on `rank`,
        in ascending order: clips of equal length sit together, so packed attention runs
        one call per distinct ratio (`PackedTokens.runs`). Which clip gets which ratio is
        as random as before: the loader's clips come in shuffled order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _RATIO_STREAM, step, micro, rank))
        if self.token_budget is None:
            return tuple(sorted(self.schedule.draw(step, self.batch_size, g)))
        out: list[float] = []
        used = 0
        while len(out) + self.group <= self.batch_size:
            drawn = self.schedule.draw(step, self.group, g)
            cost = sum(self.visible[r] for r in drawn)
            if out and used + cost > self.token_budget:
                break
            out += drawn
            used += cost
        return tuple(sorted(out))

    def clips_in_batch(self, epoch: int, batch: int, rank: int) -> int:
        """Clips in loader batch `batch` of `epoch` on `rank` (batch = step x accumulation + micro)."""
        step = epoch * self.steps_per_epoch + batch // self.grad_accum_steps
        return len(self.ratios(step, batch % self.grad_accum_steps, rank))

    def batch_counts(self, step: int, micro: int, rank: int) -> tuple[int, int, int]:
        """(clips, visible tokens, masked tokens) of one micro-batch."""
        return self.totals(list(self.ratios(step, micro, rank)))

    def step_ratios(self, step: int, world_size: int) -> list[float]:
        """The ratios of every clip of optimizer `step`, every micro-batch of every rank."""
        return [r for rank in range(world_size) for m in range(self.grad_accum_steps) for r in self.ratios(step, m, rank)]

    def totals(self, ratios: list[float]) -> tuple[int, int, int]:
        """(clips, visible tokens, masked tokens) of clips masked at `ratios`."""
        visible = sum(self.visible[r] for r in ratios)
        return len(ratios), visible, len(ratios) * self.tokens_per_clip - visible

    def step_totals(self, step: int, world_size: int) -> tuple[int, int, int]:
        """(clips, visible tokens, masked tokens) of optimizer `step` over every micro-batch
        of every rank."""
        return self.totals(self.step_ratios(step, world_size))

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
    steps_per_epoch: int,
) -> TokenBatches:
    """The batches of a run. `pairs`: mixup/cutmix is on (batches must be even)."""
    schedule = masking.schedule(grid)
    values = sorted({r for _, stage in schedule.stages for r in stage})
    n = grid[0] * grid[1] * grid[2]
    # Visible tokens per ratio, from the masks themselves (one home for the rounding rules).
    visible = {}
    for r in values:
        mask = make_mask(masking, 1, grid, torch.Generator().manual_seed(0), train=True, ratios=[r])
        visible[r] = n - (0 if mask is None else int(mask.sum()))
    group = clips_per_video * (2 if pairs and clips_per_video % 2 else 1)
    if token_budget is not None:
        largest = max(visible.values()) * group
        if token_budget < largest:
            raise ValueError(
                f"data.token_budget {token_budget} cannot hold one group of {group} clips at the lowest mask "
                f"ratio ({largest} visible tokens); raise it to at least {largest}"
            )
        if batch_size % group:
            raise ValueError(f"data.batch_size {batch_size} must be a multiple of {group} with a token budget")
    return TokenBatches(
        schedule=schedule, visible=visible, tokens_per_clip=n, seed=seed, batch_size=batch_size,
        token_budget=token_budget, group=group, grad_accum_steps=grad_accum_steps, steps_per_epoch=steps_per_epoch,
    )
