"""Resuming on another world size (marscale/checkpoints/reshape.py).

- Which combinations load plainly, which through a universal conversion, and which are
  refused before the engine is built (a ZeRO stage change).
- The resize log speaks of the global batch only when ranks x data.batch_size x
  grad_accum_steps changes, and then says what keeps it.
- After DeepSpeed's ZeRO-3 universal load, every parameter group has its own Adam step
  counter and its own settings again (`restore_group_state`).
- End to end, ZeRO-1, 2 and 3: a run saved on 2 ranks resumes on 1, and one saved on 1
  resumes on 2, with exactly the fp32 master weights and AdamW moments (every parameter
  gathered whole) that were saved, and trains on as a ZeRO-0 run of the same job resized
  the same way does (ZeRO-0 resizes without conversion): the same losses for three steps
  after each resize and the same weights and moments after them. Three launches in all
  (tests/scripts/resize_state.py runs the four stages in one process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import DEMO_CONFIG, REPO, run_overrides, subprocess_env

from marscale.core.dist import free_port
from marscale.checkpoints.reshape import (
    Layout,
    RankBatch,
    ReshapeError,
    batch_change,
    needs_universal,
    plan_resume,
    prune_conversions,
    restore_group_state,
)
from marscale.weights.layouts import CheckpointError

SCRIPT = os.path.join(REPO, "tests", "scripts", "resize_state.py")
STAGES = (1, 2, 3)
"""The stages whose checkpoints are split per rank (ZeRO-0 loads as it is: `needs_universal`)."""
REFERENCE = 0
"""The stage the others are compared with: ZeRO-0 resizes with a plain load."""


@pytest.mark.parametrize(
    "saved, now, universal",
    [
        (Layout(2, 0), Layout(1, 0), False),  # ZeRO-0: every rank holds everything
        (Layout(2, 1), Layout(2, 1), False),
        (Layout(2, 1), Layout(1, 1), True),
        (Layout(1, 2), Layout(4, 2), True),
        (Layout(8, 3), Layout(2, 3), True),
    ],
)
def test_which_resumes_need_a_universal_conversion(saved, now, universal):
    assert needs_universal(saved, now) is universal


def test_a_zero_stage_change_is_refused_with_the_setting_to_use():
    with pytest.raises(ReshapeError, match=r"saved with ZeRO-2, this run uses ZeRO-3: resume it with deepspeed.zero_stage=2"):
        needs_universal(Layout(2, 2), Layout(2, 3))


@pytest.mark.parametrize(
    "saved, now",
    [
        (Layout(2, 2, RankBatch(2, 1)), Layout(1, 2, RankBatch(4, 1))),
        (Layout(2, 2, RankBatch(2, 1)), Layout(1, 2, RankBatch(2, 2))),  # accumulation makes up the ranks
        (Layout(4, 3, RankBatch(8, 1, 4096)), Layout(2, 3, RankBatch(16, 1, 8192))),
        (Layout(2, 1, None), Layout(1, 1, RankBatch(2, 1))),  # not recorded: nothing to say
    ],
)
def test_the_resize_log_is_silent_on_the_batch_when_the_global_batch_stays(saved, now):
    assert batch_change(saved, now) is None


@pytest.mark.parametrize(
    "saved, now, said",
    [
        (Layout(2, 2, RankBatch(2, 1)), Layout(1, 2, RankBatch(2, 1)),
         "changes from 4 clips to 2 clips per step, and with it the steps per epoch: set data.batch_size=4 to keep it"),
        (Layout(1, 3, RankBatch(4, 2)), Layout(2, 3, RankBatch(4, 2)),
         "from 8 clips to 16 clips per step, and with it the steps per epoch: set data.batch_size=2 to keep it"),
        (Layout(2, 1, RankBatch(2, 1)), Layout(3, 1, RankBatch(2, 1)),
         "from 4 clips to 6 clips per step, and with it the steps per epoch: no whole data.batch_size keeps it "
         "on 3 ranks with deepspeed.grad_accum_steps=1"),
        (Layout(2, 2, RankBatch(8, 1, 4096)), Layout(4, 2, RankBatch(8, 1, 4096)),
         "from at most 16 clips and 8192 visible tokens to at most 32 clips and 16384 visible tokens per step, "
         "and with it the steps per epoch: set data.batch_size=4 and data.token_budget=2048 to keep it"),
        (Layout(2, 2, RankBatch(8, 1, 4096, "cost")), Layout(4, 2, RankBatch(8, 1, 4096, "cost")),
         "from at most 16 clips and 8192 cost-weighted tokens to at most 32 clips and 16384 cost-weighted tokens"),
    ],
)
def test_the_resize_log_says_how_the_global_batch_changes_and_what_keeps_it(saved, now, said):
    message = batch_change(saved, now)
    assert message.startswith("the global batch (ranks x data.batch_size x deepspeed.grad_accum_steps) changes")
    assert said in message


def test_a_checkpoint_from_before_budget_units_counted_visible_tokens():
    old = {"data": {"batch_size": 8, "token_budget": 4096}, "deepspeed": {"grad_accum_steps": 1}}
    assert RankBatch.of_config(old) == RankBatch(8, 1, 4096, "visible")
    old["data"]["budget_unit"] = "cost"
    assert RankBatch.of_config(old).budget_unit == "cost"


def test_after_a_universal_load_each_group_has_its_own_step_and_settings(tmp_path):
    """DeepSpeed's ZeRO-3 universal loader leaves one `step` tensor in every sub-group's
    state and the first group's settings in every group: each group gets its own back."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    saved_groups = [
        {"params": [0], "name": "layer0_decay", "weight_decay": 0.05, "lr_scale": 0.5, "lr": 1e-3},
        {"params": [1], "name": "layer1_no_decay", "weight_decay": 0.0, "lr_scale": 1.0, "lr": 1e-3},
    ]
    (tmp_path / "zero").mkdir()
    torch.save({"param_groups": saved_groups}, tmp_path / "zero" / "optimizer_state.pt")
    adam = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1.0, weight_decay=0.05, foreach=False)
    step = torch.tensor(2.0)
    for p in (a, b):  # as the loader leaves them
        adam.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    for group in adam.param_groups:
        group.update({k: v for k, v in saved_groups[0].items() if k != "params"})

    class Wrapper:  # DeepSpeed's ZeRO optimizers keep the torch optimizer as `.optimizer`
        optimizer = adam

    restore_group_state(Wrapper(), str(tmp_path))
    for group, saved in zip(adam.param_groups, saved_groups):
        assert {k: group[k] for k in ("name", "weight_decay", "lr_scale")} == {
            k: saved[k] for k in ("name", "weight_decay", "lr_scale")
        }
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    adam.step()
    assert [float(adam.state[p]["step"]) for p in (a, b)] == [3.0, 3.0]

    adam.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})
    with pytest.raises(CheckpointError, match="holds 2 optimizer parameter groups, this run builds 3"):
        restore_group_state(Wrapper(), str(tmp_path))


def test_conversions_of_pruned_checkpoints_are_deleted(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-2", "step-4"):
        (root / "universal" / name).mkdir(parents=True)
    (root / "universal" / "step-6.tmp-123").mkdir()
    (root / "step-4").mkdir()
    (root / "step-4" / "COMPLETE").write_text("{}")
    deleted = prune_conversions(str(root))
    assert sorted(os.path.basename(d) for d in deleted) == ["step-2", "step-6.tmp-123"]
    assert os.listdir(root / "universal") == ["step-4"]


def _run(cmd: list[str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _launch(world: int, out: str, runs: str, steps: int, batch_size: int, shards) -> str:
    args = [out, runs, ",".join(map(str, (REFERENCE, *STAGES))), str(steps), DEMO_CONFIG]
    for o in run_overrides(shards, runs) + [
        "data.num_workers=0", f"data.batch_size={batch_size}", "data.clips_per_video=1", "deepspeed.precision=fp32",
        "checkpoint.keep_last=0", "model.drop_path=0.0",
    ]:
        args += ["--set", o]
    if world == 1:
        return _run([sys.executable, SCRIPT, *args])
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return _run([launcher, "--num_gpus", str(world), "--no_local_rank", "--master_port", str(free_port()), SCRIPT, *args])


def _assert_same_state(saved: dict, loaded: dict, what: str) -> None:
    assert saved.keys() == loaded.keys()
    assert len(saved) > 3 * 10  # weights, exp_avg, exp_avg_sq of every parameter
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=f"{what}: {key}")


def _resize_lines(log: str) -> list[str]:
    """The resize warnings of a launch's log, one per stage (the script plans each resume
    twice: when the trainer is built and in `Trainer.resume`)."""
    lines = [line.rstrip() for line in log.splitlines() if "rank0]" in line and ", written by " in line]
    return sorted({line.split("rank0] ", 1)[1] for line in lines})  # without the time


def _assert_trains_as_reference(run: dict, reference: dict, what: str) -> None:
    """The losses of every step and the state after them, within fp32 summation order: a
    ZeRO stage reduces the gradients in another order than ZeRO-0 (about 1e-7 apart)."""
    assert len(run["losses"]) == len(reference["losses"]) >= 2
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-6, atol=0, msg=f"{what}: losses")
    assert run["saved"].keys() == reference["saved"].keys()
    for key, ref in reference["saved"].items():
        if key.endswith("/fp32"):  # weights
            torch.testing.assert_close(run["saved"][key], ref, rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")
        else:  # Adam's moments, on the scale of each tensor (exp_avg_sq is ~1e-5 at most)
            atol = 1e-5 * ref.abs().max().item()
            torch.testing.assert_close(run["saved"][key], ref, rtol=1e-5, atol=atol, msg=f"{what}: {key}")


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_one_rank_then_on_two_trains_on_exactly(synthetic_shards, tmp_path):
    runs = str(tmp_path / "runs")
    # Saves step-2 on 2 ranks x 2 clips, each stage.
    two = str(tmp_path / "two.pt")
    _launch(2, two, runs, 2, 2, synthetic_shards)
    # 2 -> 1 ranks x 4 clips (the same global batch), 3 steps, saves step-5.
    one = str(tmp_path / "one.pt")
    kept = _launch(1, one, runs, 3, 4, synthetic_shards)
    # 1 -> 2 ranks x 1 clip (half the global batch), 3 steps, saves step-8.
    back = str(tmp_path / "back.pt")
    halved = _launch(2, back, runs, 3, 1, synthetic_shards)
    two, one, back = (torch.load(f) for f in (two, one, back))

    for stage in STAGES:
        assert (two[stage]["world_size"], one[stage]["world_size"], back[stage]["world_size"]) == (2, 1, 2)
        assert one[stage]["loaded_step"] == 2 and back[stage]["loaded_step"] == 5
        _assert_same_state(two[stage]["saved"], one[stage]["loaded"], f"ZeRO-{stage} 2 -> 1 ranks")
        _assert_same_state(one[stage]["saved"], back[stage]["loaded"], f"ZeRO-{stage} 1 -> 2 ranks")
        # The state moved between the save and the next one: not a comparison of untouched copies.
        assert not torch.equal(one[stage]["saved"]["encoder.norm.weight/exp_avg"],
                               one[stage]["loaded"]["encoder.norm.weight/exp_avg"])
        assert os.path.isdir(os.path.join(runs, f"stage{stage}", "checkpoints", "universal"))
        for name, result in (("2 ranks", two), ("2 -> 1 ranks", one), ("1 -> 2 ranks", back)):
            _assert_trains_as_reference(result[stage], result[REFERENCE], f"ZeRO-{stage} vs ZeRO-0, {name}")
    assert not os.path.isdir(os.path.join(runs, f"stage{REFERENCE}", "checkpoints", "universal"))

    # One resize line per stage; the batch is spoken of only where the global batch changed.
    kept, halved = (_resize_lines(log) for log in (kept, halved))
    assert len(kept) == len(halved) == 1 + len(STAGES)
    assert "written by 2 ranks, on 1 ranks (ZeRO-2, through a universal checkpoint)" in "".join(kept)
    assert all(line.endswith("so the data order differs from the original run from here on") for line in kept)
    assert "written by 1 ranks, on 2 ranks (ZeRO-0)" in "".join(halved)
    assert all(line.endswith(
        "the global batch (ranks x data.batch_size x deepspeed.grad_accum_steps) changes from 4 clips to 2 clips "
        "per step, and with it the steps per epoch: set data.batch_size=2 to keep it") for line in halved)

    # What cannot work stops before the engine is built, with the setting to use.
    step = os.path.join(runs, "stage1", "checkpoints", "step-5")
    with pytest.raises(ReshapeError, match="deepspeed.zero_stage=1"):
        plan_resume(step, Layout(world_size=2, zero_stage=2), str(tmp_path / "other"))
