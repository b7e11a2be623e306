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


def test_per_clip_ratios_with_token_budget_train_and_resume_exactly(synthetic_shards, tmp_path):
    """Packed batches of different sizes under ZeRO-2: 6 steps straight == interrupted and
    resumed (data position, ratios, masks and random streams all come back)."""
    extra = (
        "masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5", "data.token_budget=16", "data.batch_size=6",
        "model.drop_path=0.1", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
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
    assert saved["batches"]["token_budget"] == 16

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
