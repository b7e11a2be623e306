"""Multi-process training under the `deepspeed` launcher (gloo on CPU).

Two ranks with ZeRO-2 and ZeRO-3 must complete, and in fp32 match a one-process run on
the same global batch: DeepSpeed averages the ranks' gradients, so the optimizer sees
the gradient of the mean loss over the whole batch either way.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import DEMO_CONFIG as DEMO
from helpers import REPO as ROOT
from helpers import run_overrides, subprocess_env

from marscale.core.dist import free_port

SCRIPT = os.path.join(ROOT, "tests", "scripts", "fixed_batch_steps.py")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _overrides(shards, out_dir, stage):
    return run_overrides(shards, out_dir) + [
        "model.drop_path=0.0", "data.num_workers=0", "data.mixup=0.0",
        "data.cutmix=0.0", "data.label_smoothing=0.0", "optim.clip_grad=null", "optim.weight_decay=0.0",
        f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp32",
    ]


def _run(cmd, timeout=420):
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _steps(tmp_path, shards, stage, world, steps=3, global_batch=4, uneven=False):
    out = tmp_path / f"stage{stage}_world{world}{'_uneven' if uneven else ''}.json"
    args = [str(out), DEMO, str(global_batch), str(steps)] + (["--uneven"] if uneven else [])
    for o in _overrides(shards, tmp_path / f"run{stage}_{world}", stage):
        args += ["--set", o]
    if world == 1:
        _run([sys.executable, SCRIPT, *args])
    else:
        launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
        _run([launcher, "--num_gpus", str(world), "--no_local_rank", "--master_port", str(free_port()),
              SCRIPT, *args])
    result = json.loads(out.read_text())
    assert result["world_size"] == world
    return result


@pytest.mark.parametrize(
    "stage,uneven,global_batch",
    [(2, False, 4), (3, False, 4), (3, True, 8)],
    ids=["zero2", "zero3", "zero3-packed-uneven"],
)
def test_two_ranks_match_one_rank_in_fp32(stage, uneven, global_batch, synthetic_shards, tmp_path):
    """Same global batch, same initial weights: same losses and same updated weights.

    uneven: per-clip mask ratios, packed, with rank 0 holding 2 clips and rank 1 holding 6
    (different numbers of clips and of tokens): no hang, and the step's loss weighted over
    both ranks gives what one rank gives on all 8 clips."""
    one = _steps(tmp_path, synthetic_shards, stage, world=1, global_batch=global_batch, uneven=uneven)
    two = _steps(tmp_path, synthetic_shards, stage, world=2, global_batch=global_batch, uneven=uneven)
    assert len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for a, b in zip(one["checksum"], two["checksum"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    # The weights moved: the comparison above is not between two untouched models.
    assert one["losses"][0] != one["losses"][-1]
