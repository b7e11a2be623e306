"""Throughput, TFLOP/s and MFU arithmetic, peak lookup, and the JSONL/TensorBoard writer."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from marscale.engine import metrics


@pytest.mark.parametrize("device_name, precision, name, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5),
    ("NVIDIA H100 80GB HBM3", "fp32", "H100 SXM", 67.0),
    ("NVIDIA H200", "bf16", "H200 SXM", 989.5),
    ("NVIDIA H200 NVL", "bf16", "H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100 SXM4 80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", "bf16", "A100 40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", "bf16", "A100 PCIe 80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", "A100 40GB", 19.5),
    ("NVIDIA L40S", "bf16", "L40S", 362.05),
    ("NVIDIA L40", "bf16", "L40", 181.05),  # not L40S, not L4
    ("NVIDIA L4", "bf16", "L4", 121.0),
    ("Tesla V100-SXM2-32GB", "fp16", "V100 SXM2", 125.0),
])
def test_device_names_map_to_their_peak(device_name, precision, name, tflops):
    peak = metrics.lookup_peak(device_name, precision)
    assert peak == metrics.Peak(tflops, f"{name} {precision} dense")
    assert peak.describe() == f"MFU against {name} {precision} dense, {tflops:g} TFLOP/s"
    assert metrics.match_device(device_name).name == name


def test_no_peak_says_why():
    v100 = metrics.lookup_peak("Tesla V100-SXM2-32GB", "bf16")  # no bf16 units
    assert v100 == metrics.Peak(None, "no MFU: V100 SXM2 has no dense bf16 peak (set logging.peak_tflops)")
    assert v100.describe() == v100.name
    unknown = metrics.lookup_peak("Some Future GPU", "bf16")
    assert unknown.tflops is None and unknown.name == (
        "no MFU: 'Some Future GPU' is not in the peak table (set logging.peak_tflops)")
    assert metrics.lookup_peak("Some Future GPU", "bf16", 2000.0) == metrics.Peak(2000.0, "logging.peak_tflops (set)")
    cpu = torch.device("cpu")
    assert metrics.resolve_peak(cpu, "bf16", None).tflops is None  # no MFU on CPUs by default
    assert "no MFU" in metrics.resolve_peak(cpu, "bf16", None).describe()
    assert metrics.resolve_peak(cpu, "bf16", 1.5) == metrics.Peak(1.5, "logging.peak_tflops (set)")
    # a benchmark names its own flag
    assert metrics.resolve_peak(cpu, "bf16", None, "--peak-tflops").name == (
        "no MFU: cpu has no peak in the table (set --peak-tflops)")
    assert metrics.resolve_peak(cpu, "bf16", 0.5, "--peak-tflops") == metrics.Peak(0.5, "--peak-tflops (set)")


def test_one_peak_table_for_the_engine_and_the_benchmark():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_model_peaks", os.path.join(REPO, "benchmarks", "bench_model.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    assert bench.resolve_peak is metrics.resolve_peak and bench.match_device is metrics.match_device
    assert not [k for k in vars(bench) if "PEAK" in k or "BANDWIDTH" in k]  # no table of its own
    assert metrics.match_device("NVIDIA H100 PCIe").bandwidth_tbs == 2.0


def test_throughput_and_mfu():
    cost = metrics.StepCost(
        clips_per_step=16, visible_tokens_per_clip=784, flops_per_clip=int(2e12), world_size=2,
        peak=metrics.Peak(100.0, "H100 SXM bf16 dense"),
    )
    out = metrics.throughput(cost, steps=10, seconds=4.0, data_seconds=1.0)
    assert out["clips_per_s"] == pytest.approx(40.0)
    assert out["visible_tokens_per_s"] == pytest.approx(40.0 * 784)
    # 40 clips/s x 2 TFLOP per clip over 2 devices = 40 TFLOP/s per device, 40% of 100.
    assert out["tflops_per_device"] == pytest.approx(40.0)
    assert out["mfu"] == pytest.approx(0.4)
    assert out["mfu_peak_tflops"] == 100.0 and out["mfu_peak"] == "H100 SXM bf16 dense"
    assert out["data_wait"] == pytest.approx(0.25)
    assert out["step_time_s"] == pytest.approx(0.4)
    no_peak = metrics.throughput(
        metrics.StepCost(16, 784, int(2e12), 2, metrics.Peak(None, "no MFU: cpu")), steps=10, seconds=4.0,
        data_seconds=0.0,
    )
    assert not [k for k in no_peak if k.startswith("mfu")]
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
