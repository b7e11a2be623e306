"""benchmarks/bench_model.py, the GPU harness: runs where only PyTorch is installed (every
other dependency hidden) and writes its JSON result with device, versions, settings,
phase times and ratio checks; exercised on the CPU at tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

from marscale.core.clip import ClipConfig
from marscale.cost.counting import count_model
from marscale.model import ModelConfig

# Hide every dependency but torch (and numpy, which torch itself imports): an import of
# any of them fails as if it were not installed.
ONLY_TORCH = (
    "import runpy, sys\n"
    "for name in ('deepspeed', 'timm', 'torchvision', 'webdataset', 'decord', 'av', 'yaml', 'tensorboard',\n"
    "             'tqdm', 'matplotlib', 'psutil'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['bench_model.py'] + sys.argv[1:]\n"
    "runpy.run_path('benchmarks/bench_model.py', run_name='__main__')\n"
)


def test_harness_with_only_torch_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--variants", "vit_tiny", "--also-full", "vit_s", "--reference", "vit_s",
            "--img-size", "32", "--num-frames", "4", "--warmup", "0", "--repeats", "1", "--amp",
            "--grad-checkpointing", "both", "--peak-tflops", "0.5", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", ONLY_TORCH, *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "CPU, 1 thread" and doc["torch"] and "commit" in doc
    assert doc["args"]["grad_checkpointing"] == "both" and doc["args"]["optimizer"] is True
    results = doc["results"]
    # vit_tiny MAR 50% and full, vit_s full; each with and without recomputation; train and infer
    assert len(results) == 3 * 2 * 2
    assert {r["recompute"] for r in results} == {False, True}
    train = [r for r in results if r["mode"] == "train"]
    assert all(set(r["phase_s"]) == {"forward", "backward", "optimizer"} for r in train)
    assert all(r["median_s"] > 0 and r["error"] is None for r in results)
    mar = next(r for r in train if r["ratio"] == 0.5 and not r["recompute"])
    clip = ClipConfig(num_frames=4, img_size=32)
    counted = count_model(ModelConfig(num_classes=400, arch="mar", variant="vit_tiny"), clip, 0.5)
    assert mar["flops_per_clip"] == 2 * counted.macs_training
    assert mar["flops_forward_per_clip"] == 2 * counted.macs_training_forward
    assert any("vs full ViT-S" in line and "of the FLOP ratio" in line for line in doc["ratio_checks"])
    assert "Training step by phase" in proc.stdout
    # the peak every MFU divides by is named beside it: printed, in the JSON and each result
    assert "MFU against --peak-tflops (set), 0.5 TFLOP/s" in proc.stdout
    assert doc["mfu_peak"] == "--peak-tflops (set)" and doc["peak_tflops"] == 0.5
    assert all(r["mfu_peak"] == doc["mfu_peak"] and r["mfu_peak_tflops"] == 0.5 for r in results)
    assert all(r["mfu"] == pytest.approx(r["flops_per_clip"] * r["batch"] / r["median_s"] / 1e12 / 0.5)
               for r in results)
