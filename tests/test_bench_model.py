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
            "--img-size", "32", "--num-frames", "4", "--warmup", "0", "--repeats", "1",
            "--precision", "bf16-weights",
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
    # every row of the table names its precision and the peak its MFU divides by
    rows = [line for line in proc.stdout.splitlines() if "| train |" in line or "| infer |" in line]
    assert len(rows) == 12 and all("| bf16-weights |" in r and r.endswith("| 0.5 (--peak-tflops (set)) |") for r in rows)
    assert doc["precision"] == "bf16-weights" and {r["precision"] for r in results} == {"bf16-weights"}
    assert doc["complete"] is True


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_model.py as a module, in this process (torch's thread count restored)."""
    import importlib.util
    import os

    import torch

    spec = importlib.util.spec_from_file_location("bench_model_case", os.path.join(REPO, "benchmarks", "bench_model.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


TINY = ["--device", "cpu", "--variants", "vit_tiny", "--img-size", "32", "--num-frames", "4", "--warmup", "0"]


def test_bf16_weights_train_as_the_engine_does_with_fp32_master_weights(bench):
    import torch

    args = bench.parse_args([*TINY, "--precision", "bf16-weights"])
    case = bench.Case(args, bench.Setup("vit_tiny", 0.5), torch.device("cpu"))
    assert {p.dtype for p in case.params} == {torch.bfloat16} and case.video.dtype == torch.bfloat16
    assert {m.dtype for m in case.master} == {torch.float32}
    assert all(torch.equal(p.float(), m) for p, m in zip(case.params, case.master))
    out = case.model(case.video, case.tokens)
    case.loss(out, case.video, case.tokens, case.target)["loss"].backward()
    grads = [p.grad.float() for p in case.params]
    before = [m.clone() for m in case.master]
    case.optimizer_step()
    # AdamW's first step on the fp32 master from the bf16 gradients: decay, then
    # lr x g / (|g| + eps); the bf16 weights are the master rounded.
    for p, m, m0, g in zip(case.params, case.master, before, grads):
        decay = 0.05 if m.ndim > 1 else 0.0
        torch.testing.assert_close(m, m0 * (1 - 1e-4 * decay) - 1e-4 * g / (g.abs() + 1e-8), rtol=0, atol=1e-7)
        assert torch.equal(p, m.to(torch.bfloat16))
    # fp32 keeps the updates bf16 cannot hold: the master is not its own rounding
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in case.master)
    autocast = bench.Case(bench.parse_args([*TINY, "--precision", "autocast-fp32-weights"]),
                          bench.Setup("vit_tiny", 0.5), torch.device("cpu"))
    assert autocast.master is None and {p.dtype for p in autocast.params} == {torch.float32}


def test_a_failing_case_leaves_the_other_results_in_the_json(bench, monkeypatch, tmp_path):
    step = bench.Case.step

    def failing(self, mode, mark=lambda phase: None):
        if self.setup.ratio == 0.5 and mode == "train":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")
        return step(self, mode, mark)

    monkeypatch.setattr(bench.Case, "step", failing)
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--also-full", "vit_s", "--repeats", "2", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["precision"] == "fp32"
    results = {(r["setup"], r["mode"]): r for r in doc["results"]}
    assert len(results) == 3 * 2  # vit_tiny MAR 50% and full, vit_s full; train and infer
    bad = results[("ViT-Ti MAR 50%", "train")]
    assert bad["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert bad["median_s"] is None and bad["times_s"] == []
    good = [r for key, r in results.items() if key != ("ViT-Ti MAR 50%", "train")]
    assert all(r["error"] is None and len(r["times_s"]) == 2 and r["median_s"] > 0 for r in good)
    assert doc["mfu_peak"] == "no MFU: cpu has no peak in the table (set --peak-tflops)"


def test_an_interrupted_run_writes_what_was_timed(bench, monkeypatch, tmp_path):
    step, calls = bench.Case.step, []

    def interrupted(self, mode, mark=lambda phase: None):
        calls.append(mode)
        if len(calls) == 3:  # the round robin's third case: full train, first repeat
            raise KeyboardInterrupt
        return step(self, mode, mark)

    monkeypatch.setattr(bench.Case, "step", interrupted)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--repeats", "2", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] is False
    timed = [(r["setup"], r["mode"]) for r in doc["results"] if r["times_s"]]
    assert timed == [("ViT-Ti MAR 50%", "train"), ("ViT-Ti MAR 50%", "infer")]
    assert all(r["error"] == "not timed: the run was interrupted" for r in doc["results"] if not r["times_s"])
    assert len(doc["results"]) == 4
