"""`marscale demo --quick` (README command one, small): a plain process without a
launcher renders the synthetic set, shards it, trains, evaluates and prints the result
and the cost table; a second run skips every finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow


def run_demo(out: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "marscale.cli", "demo", "--quick", "--out", out],
        cwd=REPO, env=subprocess_env(one_thread=False), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_quick_demo_end_to_end_then_skips_finished_stages(tmp_path):
    out = str(tmp_path / "demo")
    log = run_demo(out)
    for split, videos in (("train", 96), ("val", 32)):
        manifest = json.load(open(os.path.join(out, "data", "shards", split, "manifest.json")))
        assert manifest["num_samples"] == videos, manifest.keys()
    result = json.load(open(os.path.join(out, "run-quick", "eval.json")))
    assert result["step"] == 24 and result["num_videos"] == 32
    assert f"validation top-1 {result['top1']:.1f}% (chance 25%)" in log
    assert "step 10/24 |" in log  # logged every 10 steps
    assert "MAR 50%        64/128 tokens" in log and "ViT-L  MAR 50%" in log  # the cost tables
    assert "preparing data: " in log and "marscale-shards synth --out" in log  # the tools' own command

    again = run_demo(out)
    assert "synthetic shards already in" in again and "training already finished" in again
    assert "rendered" not in again and "preparing data" not in again and "step 10/24 |" not in again
    assert f"validation top-1 {result['top1']:.1f}%" in again
