"""Resuming on another world size (marscale/checkpoints/reshape.py).

- Which combinations load plainly, which through a universal conversion, and which are
  refused before the engine is built (a ZeRO stage change).
- End to end, ZeRO-1, 2 and 3: a run saved on 2 ranks resumes on 1, and one saved on 1
  resumes on 2, with exactly the fp32 master weights and AdamW moments (every parameter
  gathered whole) that were saved; the log says what changes. Three launches in all
  (tests/scripts/resize_state.py runs the three stages in one process).
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
from marscale.checkpoints.reshape import Layout, ReshapeError, needs_universal, plan_resume, prune_conversions

SCRIPT = os.path.join(REPO, "tests", "scripts", "resize_state.py")
STAGES = (1, 2, 3)
"""The stages whose checkpoints are split per rank (ZeRO-0 loads as it is: `needs_universal`)."""


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


def _launch(world: int, out: str, runs: str, steps: int, shards) -> str:
    args = [out, runs, ",".join(map(str, STAGES)), str(steps), DEMO_CONFIG]
    for o in run_overrides(shards, runs) + [
        "data.num_workers=0", "data.batch_size=2", "deepspeed.precision=fp32", "checkpoint.keep_last=0",
        "model.drop_path=0.0",
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


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_one_rank_then_on_two_restores_the_exact_state(synthetic_shards, tmp_path):
    runs = str(tmp_path / "runs")
    two = str(tmp_path / "two.pt")
    _launch(2, two, runs, 2, synthetic_shards)  # saves step-2 on 2 ranks, each stage
    one = str(tmp_path / "one.pt")
    log = _launch(1, one, runs, 2, synthetic_shards)  # 2 -> 1, then saves step-4 on 1 rank
    back = str(tmp_path / "back.pt")
    _launch(2, back, runs, 1, synthetic_shards)  # 1 -> 2
    two, one, back = (torch.load(f) for f in (two, one, back))

    for stage in STAGES:
        assert (two[stage]["world_size"], one[stage]["world_size"], back[stage]["world_size"]) == (2, 1, 2)
        assert one[stage]["loaded_step"] == 2 and back[stage]["loaded_step"] == 4
        _assert_same_state(two[stage]["saved"], one[stage]["loaded"], f"ZeRO-{stage} 2 -> 1 ranks")
        _assert_same_state(one[stage]["saved"], back[stage]["loaded"], f"ZeRO-{stage} 1 -> 2 ranks")
        # The state moved between the save and the next one: not a comparison of untouched copies.
        assert not torch.equal(one[stage]["saved"]["encoder.norm.weight/exp_avg"],
                               one[stage]["loaded"]["encoder.norm.weight/exp_avg"])
        assert os.path.isdir(os.path.join(runs, f"stage{stage}", "checkpoints", "universal"))
    assert "written by 2 ranks, on 1 ranks (ZeRO-2, through a universal checkpoint)" in log
    assert "the data order differs from the original run from here on" in log
    assert "the global batch is now 2 clips per step" in log

    # What cannot work stops before the engine is built, with the setting to use.
    step = os.path.join(runs, "stage1", "checkpoints", "step-4")
    with pytest.raises(ReshapeError, match="deepspeed.zero_stage=1"):
        plan_resume(step, Layout(world_size=2, zero_stage=2), str(tmp_path / "other"), clips_per_step=4)
