"""Throughput, TFLOP/s and MFU arithmetic, peak lookup, and the JSONL/TensorBoard writer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from marscale.engine import metrics


def test_peak_lookup():
    assert metrics.lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert metrics.lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert metrics.lookup_peak_tflops("NVIDIA H200", "fp32") == 66.9
    assert metrics.lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert metrics.lookup_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 units
    assert metrics.lookup_peak_tflops("Some Future GPU", "bf16") is None
    cpu = torch.device("cpu")
    assert metrics.peak_tflops(cpu, "bf16", None) is None  # no MFU on CPUs by default
    assert metrics.peak_tflops(cpu, "bf16", 1.5) == 1.5


def test_throughput_and_mfu():
    cost = metrics.StepCost(
        clips_per_step=16, visible_tokens_per_clip=784, flops_per_clip=int(2e12), world_size=2, peak_tflops=100.0
    )
    out = metrics.throughput(cost, steps=10, seconds=4.0, data_seconds=1.0)
    assert out["clips_per_s"] == pytest.approx(40.0)
    assert out["visible_tokens_per_s"] == pytest.approx(40.0 * 784)
    # 40 clips/s x 2 TFLOP per clip over 2 devices = 40 TFLOP/s per device, 40% of 100.
    assert out["tflops_per_device"] == pytest.approx(40.0)
    assert out["mfu"] == pytest.approx(0.4)
    assert out["data_wait"] == pytest.approx(0.25)
    assert out["step_time_s"] == pytest.approx(0.4)
    no_peak = metrics.throughput(
        metrics.StepCost(16, 784, int(2e12), 2, None), steps=10, seconds=4.0, data_seconds=0.0
    )
    assert "mfu" not in no_peak
    assert metrics.throughput(cost, steps=0, seconds=1.0, data_seconds=0.0) == {}


def test_peak_memory_on_cpu_is_rss():
    before = metrics.peak_memory_bytes(torch.device("cpu"))
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    block.add_(1)
    after = metrics.peak_memory_bytes(torch.device("cpu"))
    assert after >= before > 0
    assert after >= 64 * 2**20


def test_writer_appends_jsonl_and_tensorboard(tmp_path):
    out = str(tmp_path)
    w = metrics.MetricsWriter(out, enabled=True, tensorboard=True)
    w.log("metrics", 1, {"loss": 1.5, "lr": 1e-3, "note": "x"})
    w.log("metrics", 2, {"loss": 1.25, "lr": 1e-3})
    w.close()
    w = metrics.MetricsWriter(out, enabled=True, tensorboard=False)  # a resumed run appends
    w.log("metrics", 2, {"loss": 1.0})
    w.close()
    records = metrics.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 2]
    assert metrics.by_step(records)[2]["loss"] == 1.0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tb")))

    quiet = metrics.MetricsWriter(str(tmp_path / "other"), enabled=False, tensorboard=True)
    quiet.log("metrics", 1, {"loss": 1.0})
    quiet.close()
    assert not os.path.exists(tmp_path / "other")


def test_format_record():
    line = metrics.format_record({"loss": 1.23456, "lr": 1e-4, "step": 3})
    assert line == "loss 1.235 | lr 1.000e-04 | step 3"
    # Counts show their non-zero entries, and nothing when all are zero.
    counts = {"read": 0, "incomplete": 2, "decode": 1}
    assert metrics.format_record({"loss": 1.0, "skipped_samples": counts}) == (
        "loss 1 | skipped_samples incomplete 2, decode 1"
    )
    assert metrics.format_record({"loss": 1.0, "skipped_samples": dict.fromkeys(counts, 0)}) == "loss 1"
    json.dumps({"ok": line})
