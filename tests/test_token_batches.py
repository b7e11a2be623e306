"""Per-clip mask ratios and token-budget batches: the batch plan, the loss weighting, and
training with them (packed batches under DeepSpeed, exact resume)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_engine_trainer import losses, micro_step, preempt_after, step_tokens, tiny_config

from marscale.core import dist
from marscale.core.config import ConfigError
from marscale.checkpoints import folders as ckpt
from marscale.engine.metrics import by_step, read_jsonl
from marscale.engine.plan import make_plan
from marscale.engine.optim import apply_lr
from marscale.engine.trainer import Trainer
from marscale.tokens.masking import MaskingConfig
from marscale.tokens.batches import build_token_batches, loss_scales

GRID = (2, 2, 2)  # the tiny clips: 8 tokens, one 2x2 cell per time slice


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()


def batches(ratio, **kw):
    args = dict(seed=0, batch_size=8, token_budget=None, clips_per_video=1, pairs=False, grad_accum_steps=2)
    args.update(kw)
    return build_token_batches(MaskingConfig(ratio=ratio, eval_ratio=0.5), GRID, **args)


def test_ratio_forms_parse_and_fail_clearly():
    assert MaskingConfig(ratio=[0.75, 0.25, 0.25], eval_ratio=0.5).schedule().stages == ((0, (0.25, 0.75)),)
    assert MaskingConfig(ratio={"min": 0.2, "max": 0.8}, eval_ratio=0.5).schedule().stages == ((0, (0.25, 0.5, 0.75)),)
    sched = MaskingConfig(
        ratio={"schedule": [{"from_step": 0, "ratio": 0.25}, {"from_step": 10, "ratio": [0.5, 0.75]}]}, eval_ratio=0.5
    ).schedule()
    assert sched.at(0) == (0.25,) and sched.at(9) == (0.25,) and sched.at(10) == (0.5, 0.75)
    # random masking: a range covers every whole number of masked tokens in it
    rnd = MaskingConfig(kind="random", ratio={"min": 0.25, "max": 0.5}, eval_ratio=0.5).schedule((2, 2, 2))
    assert rnd.stages[0][1] == (0.25, 0.375, 0.5)
    with pytest.raises(ValueError, match=r"ratio 0.3\b"):
        MaskingConfig(ratio=[0.25, 0.3], eval_ratio=0.5)
    with pytest.raises(ValueError, match="set masking.eval_ratio"):
        MaskingConfig(ratio=[0.25, 0.5])
    with pytest.raises(ValueError, match="must start at from_step 0"):
        MaskingConfig(ratio={"schedule": [{"from_step": 5, "ratio": 0.5}]}, eval_ratio=0.5)
    with pytest.raises(ValueError, match="whole number of the 4 cell slots"):
        MaskingConfig(ratio={"min": 0.3, "max": 0.45}, eval_ratio=0.5)
    with pytest.raises(ValueError, match="expected a ratio"):
        MaskingConfig(ratio={"low": 0.3}, eval_ratio=0.5)


def test_ratio_in_yaml_and_overrides(synthetic_shards, tmp_path):
    cfg = tiny_config(synthetic_shards, tmp_path, "masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5")
    assert cfg.masking.per_clip and cfg.masking.schedule().stages == ((0, (0.25, 0.5, 0.75)),)
    with pytest.raises(ConfigError, match="masking.*0.3"):
        tiny_config(synthetic_shards, tmp_path, "masking.ratio=[0.3]", "masking.eval_ratio=0.5")


def test_batches_are_a_function_of_seed_step_micro_rank():
    b = batches([0.25, 0.5, 0.75])
    assert b.ratios(3, 1, 0) == b.ratios(3, 1, 0)
    assert b.ratios(3, 1, 0) != b.ratios(3, 1, 1) or b.ratios(3, 0, 0) != b.ratios(4, 0, 0)
    drawn = [r for step in range(50) for r in b.ratios(step, 0, 0)]
    for value in (0.25, 0.5, 0.75):  # uniform over the set: 400 draws, each about a third
        assert 100 < drawn.count(value) < 170
    assert b.varies and not batches(0.5).varies


def test_token_budget_fills_batches_by_visible_tokens():
    # visible tokens per clip: 6 at 25%, 4 at 50%, 2 at 75%
    b = batches([0.25, 0.5, 0.75], token_budget=16, batch_size=6, clips_per_video=2)
    assert b.visible == {0.25: 6, 0.5: 4, 0.75: 2}
    sizes = set()
    for step in range(40):
        for micro in range(2):
            ratios = b.ratios(step, micro, 0)
            tokens = sum(b.visible[r] for r in ratios)
            assert len(ratios) % 2 == 0 and len(ratios) <= 6
            assert tokens <= 16 or len(ratios) == 2  # one group always fits
            sizes.add(len(ratios))
            assert b.micro_batch(step, micro, 0).clips == len(ratios)
    assert sizes == {2, 4, 6}  # 75%-masked clips make bigger batches
    with pytest.raises(ValueError, match="cannot hold one group"):
        batches([0.25, 0.75], token_budget=10, clips_per_video=2)


# Counted training FLOPs of a clip by visible tokens, shaped as the demo model's (MFLOP at
# 32/64/96 of 128 tokens: the decoder runs on every token, so a 75%-masked clip costs 46%
# of a 25%-masked one, not 33%).
DEMO_LIKE_FLOPS = {2: 1019, 4: 1600, 6: 2213}


def demo_like_flops(counts):
    return {v: DEMO_LIKE_FLOPS[v] for v in counts}


def step_cv(b, flops, steps=600):
    costs = [b.step_batches(s, 1).work(flops)[2] for s in range(steps)]
    mean = sum(costs) / len(costs)
    return (sum((c - mean) ** 2 for c in costs) / len(costs)) ** 0.5 / mean


def test_a_budget_without_a_unit_composes_what_it_did_before():
    """The first micro-batches of the token-budget test's stream, as the visible-token budget
    drew them before budgets had a unit (and still does by default)."""
    b = batches([0.25, 0.5, 0.75], token_budget=16, batch_size=6, clips_per_video=2)
    assert b.budget_unit == "visible" and b.weight == b.visible and b.capacity == 16
    assert [b.ratios(s, 0, 0) for s in range(4)] == [
        (0.5, 0.5, 0.75, 0.75), (0.25, 0.75), (0.25, 0.5, 0.5, 0.75), (0.5, 0.5, 0.75, 0.75, 0.75, 0.75)
    ]


def test_cost_budget_fills_batches_by_counted_flops():
    # 36 tokens of 25%-masked clips (6 visible, 2213 FLOPs each): 36 x 2213 // 6 = 13278 FLOPs
    b = batches([0.25, 0.5, 0.75], token_budget=36, batch_size=12, clips_per_video=2, budget_unit="cost",
                clip_flops=demo_like_flops)
    assert b.weight == {0.25: 2213, 0.5: 1600, 0.75: 1019} and b.capacity == 13278
    group_max = 2 * 2213
    sizes = set()
    for step in range(200):
        for micro in range(2):
            mb = b.micro_batch(step, micro, 0)
            cost = sum(DEMO_LIKE_FLOPS[v] for v in mb.visible)
            assert cost <= b.capacity  # never over the budget
            assert mb.clips == 12 or b.capacity - cost < group_max  # within one group's cost of it
            sizes.add(mb.clips)
    assert sizes == {6, 8, 10}
    # The least-masked clips weigh their visible tokens: at that ratio alone both units form
    # the same batches, here 3 groups (36 of the 40 tokens; a fourth group would need 48).
    alone = dict(token_budget=40, batch_size=12, clips_per_video=2)
    cost_only = batches([0.25], budget_unit="cost", clip_flops=demo_like_flops, **alone)
    assert [cost_only.ratios(s, 0, 0) for s in range(5)] == [(0.25,) * 6] * 5 == [
        batches([0.25], **alone).ratios(s, 0, 0) for s in range(5)
    ]


def test_cost_budget_spreads_the_counted_cost_of_a_step_least():
    """600 seeded steps of one micro-batch: 8 clips, or budgets of what 8 clips at 50% weigh
    (32 visible tokens; 8 x 1600 FLOPs = 34.7 tokens of 25%-masked clips, rounded up)."""
    fixed = batches([0.25, 0.5, 0.75], batch_size=8, grad_accum_steps=1)
    common = dict(batch_size=24, clips_per_video=1, grad_accum_steps=1)
    visible = batches([0.25, 0.5, 0.75], token_budget=32, **common)
    cost = batches([0.25, 0.5, 0.75], token_budget=35, budget_unit="cost", clip_flops=demo_like_flops, **common)
    spread = {name: step_cv(b, DEMO_LIKE_FLOPS) for name, b in (("fixed", fixed), ("visible", visible), ("cost", cost))}
    # the benchmark's numbers at the demo's shapes (benchmarks/bench_budget.py): 10.8%, 6.2%, 4.9%
    assert spread["fixed"] == pytest.approx(0.108, abs=0.01)
    assert spread["visible"] == pytest.approx(0.062, abs=0.01)
    assert spread["cost"] == pytest.approx(0.049, abs=0.01)
    assert spread["cost"] < 0.85 * spread["visible"]


def test_budget_unit_is_checked():
    with pytest.raises(ValueError, match="cannot hold one group of 2 clips at mask ratio 0.25 .*at least 12"):
        batches([0.25, 0.75], token_budget=11, clips_per_video=2, budget_unit="cost", clip_flops=demo_like_flops)
    assert batches([0.25, 0.75], token_budget=12, clips_per_video=2, budget_unit="cost",
                   clip_flops=demo_like_flops).capacity == 2 * 2213
    with pytest.raises(ValueError, match="needs the clips' counted FLOPs"):
        batches([0.25, 0.75], token_budget=12, budget_unit="cost")
    with pytest.raises(ValueError, match=r"budget_unit must be one of \('visible', 'cost'\), got 'flops'"):
        batches([0.25, 0.75], token_budget=12, budget_unit="flops")


def test_budget_unit_in_the_config(synthetic_shards, tmp_path):
    ratios = ("masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5")
    assert tiny_config(synthetic_shards, tmp_path, *ratios, "data.token_budget=16").data.budget_unit == "visible"
    with pytest.raises(ConfigError, match="'data.budget_unit' expects 'visible' \\| 'cost', got 'flops'"):
        tiny_config(synthetic_shards, tmp_path, *ratios, "data.token_budget=16", "data.budget_unit=flops")
    with pytest.raises(ConfigError, match="weighs clips against token_budget, which is null: set token_budget"):
        tiny_config(synthetic_shards, tmp_path, *ratios, "data.budget_unit=cost")
    cfg = tiny_config(synthetic_shards, tmp_path, *ratios, "data.token_budget=16", "data.budget_unit=cost",
                      "data.batch_size=6")
    plan = make_plan(cfg, 1)
    by_visible = plan.flops_by_visible  # the plan's one count: the budget's weights are these
    assert plan.batches.weight == {r: by_visible[v] for r, v in plan.batches.visible.items()}
    assert plan.batches.capacity == 16 * by_visible[6] // 6
    assert f"batches of at most {plan.batches.capacity / 1e9:.2f} GFLOP (the cost of 16 visible tokens of clips " \
           "masked at 0.25)" in plan.summary()


def test_loss_scales_make_one_big_batch():
    # 2 ranks x 2 micro-batches with 3, 5, 4, 4 clips: each micro-batch's mean, scaled, sums
    # (after DeepSpeed's / world / accumulation) to the mean over all 16 clips.
    sizes, masked = [3, 5, 4, 4], [10, 6, 8, 8]
    per_clip_loss = [torch.rand(n) for n in sizes]
    world, accum = 2, 2
    total = 0.0
    for n, m, losses_ in zip(sizes, masked, per_clip_loss):
        cls, recon = loss_scales((n, m), (16, 32), world, accum)
        total += cls * losses_.mean() / (world * accum)
        assert recon == pytest.approx(m * 4 / 32)
    assert float(total) == pytest.approx(float(torch.cat(per_clip_loss).mean()), rel=1e-6)
    assert loss_scales((4, 8), (16, 32), 2, 2) == (1.0, 1.0)


@pytest.mark.parametrize("unit", ["visible", "cost"])
def test_per_clip_ratios_with_token_budget_train_and_resume_exactly(unit, synthetic_shards, tmp_path):
    """Packed batches of different sizes under ZeRO-2, sized by visible tokens or by counted
    cost: 6 steps straight == interrupted and resumed (data position, ratios, masks and
    random streams all come back)."""
    extra = (
        "masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5", "data.token_budget=16", "data.batch_size=6",
        f"data.budget_unit={unit}", "model.drop_path=0.1", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
    )
    straight_dir = tmp_path / "straight"
    trainer = Trainer(tiny_config(synthetic_shards, straight_dir, *extra))
    try:
        assert trainer.fit() == 0
        plan = trainer.plan
    finally:
        trainer.close()
    straight = losses(straight_dir)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    # Metrics count the clips and tokens each step really ran.
    records = by_step(read_jsonl(os.path.join(straight_dir, "metrics.jsonl")))
    for step, record in records.items():
        clips, visible, _ = plan.batches.step_batches(step - 1, 1).totals
        assert record["samples"] == sum(plan.batches.step_batches(s, 1).totals[0] for s in range(step))
        assert record["visible_tokens_per_s"] / record["clips_per_s"] == pytest.approx(visible / clips)
    sizes = {plan.batches.step_batches(s, 1).totals[0] for s in range(6)}
    assert len(sizes) > 1, sizes  # batches really differ in size
    saved = json.load(open(straight_dir / "plan.json"))
    assert saved["batches"]["token_budget"] == 16 and saved["batches"]["budget_unit"] == unit
    for s in range(6):  # what each step held fits in the budget, in its unit
        (mb,) = plan.batches.step_batches(s, 1).by_rank[0]
        assert sum(plan.batches.weight[r] for r in mb.ratios) <= plan.batches.capacity

    run_dir = tmp_path / "preempted"
    cfg = tiny_config(synthetic_shards, run_dir, *extra, "checkpoint.resume=auto")
    preempt_after(cfg, 3)
    assert ckpt.list_checkpoints(ckpt.checkpoints_root(str(run_dir)))
    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    resumed = losses(run_dir)
    assert resumed == straight


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_packed_training_under_every_zero_stage(stage, synthetic_shards, tmp_path):
    """Per-clip ratios (packed batches) train under ZeRO-0/1/3 in bf16: finite losses that
    go down on a fixed batch."""
    cfg = tiny_config(
        synthetic_shards, tmp_path, "masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5",
        f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16",
    )
    trainer = Trainer(cfg)
    try:
        g = torch.Generator().manual_seed(0)
        video = torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.arange(4) % 4
        packed = step_tokens(trainer)
        assert packed is not None and len(set(packed.lengths)) > 1, packed.lengths
        apply_lr(trainer.engine.optimizer, 2e-3)
        run = [micro_step(trainer, video, labels, packed)["loss"].item() for _ in range(6)]
        assert all(torch.isfinite(torch.tensor(run))) and run[-1] < run[0], run
    finally:
        trainer.close()


def test_a_step_is_described_once_and_uses_the_ratios_its_loader_carried(monkeypatch):
    b = batches([0.25, 0.5, 0.75], token_budget=16, batch_size=6, clips_per_video=2)
    calls = []
    original = type(b).ratios
    monkeypatch.setattr(type(b), "ratios", lambda self, *a: calls.append(a) or original(self, *a))
    mine = [b.describe((0.75, 0.75)), b.describe((0.25, 0.25, 0.5, 0.5))]  # what rank 1's loader carried
    step = b.step_batches(7, world_size=3, rank=1, mine=mine)
    assert sorted(calls) == sorted((7, m, r) for r in (0, 2) for m in (0, 1))  # only the other ranks drawn
    assert step.by_rank[1] == tuple(mine)
    clips, visible, masked = step.totals
    assert clips == sum(mb.clips for micro in step.by_rank for mb in micro)
    assert visible + masked == clips * 8
    # Loss scales from the one description: clips and masked tokens of the whole step.
    assert step.scales(1, 0) == loss_scales((2, 12), (clips, masked), 3, 2)
    assert step.work({2: 10, 4: 20, 6: 30})[2] == sum(
        {2: 10, 4: 20, 6: 30}[v] for micro in step.by_rank for mb in micro for v in mb.visible
    )
