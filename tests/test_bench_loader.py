"""benchmarks/bench_loader.py's pieces other scripts and its JSON depend on: the device
augmentation measured at a preset's shapes (what benchmarks/gpu_check.py calls), the
count of both sides of the device placement, and a failing case recorded beside the
others. (The benchmark itself renders and decodes videos for minutes: not run here.)
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark

bench_loader = load_benchmark("bench_loader")


def test_device_augment_is_measured_at_the_presets_shapes():
    result = bench_loader.measure_device_augment(
        "mar_vit_l_k400", batch=2, device="cpu", overrides=["clip.num_frames=4", "clip.img_size=32"], repeats=2,
        frame_size=(40, 56),
    )
    assert json.loads(json.dumps(result)) == result  # JSON-ready
    assert (result["clip"], result["frames"], result["batch"]) == ([4, 32, 32], [40, 56], 2)
    assert result["parameter_batches"] == 2 and len(result["ms_per_batch_range"]) == 2
    # The K400 preset's recipe: RandAugment on the full frames, its erasing.
    assert result["rand_augment_before_crop"] is True and result["random_erasing"] == 0.25
    assert result["clock"].startswith("process CPU time") and result["device"].startswith("CPU")
    assert result["ms_per_batch"] > 0 and result["ms_per_clip"] == pytest.approx(result["ms_per_batch"] / 2)
    low, high = result["ms_per_batch_range"]
    assert low <= result["ms_per_batch"] <= high
    # On a CPU the device is the CPU: its time is the host's.
    assert result["host_cpu_ms_per_batch"] == result["ms_per_batch"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_augment_is_timed_with_cuda_events_on_a_gpu():
    result = bench_loader.measure_device_augment("mar_vit_l_k400", batch=2, device="cuda", repeats=2)
    assert result["clock"] == "CUDA events" and result["clip"] == [16, 224, 224]
    assert result["ms_per_batch"] > 0 and result["host_cpu_ms_per_batch"] > 0


def test_both_sides_count_the_workers_and_the_device_sides_cpu_time():
    assert bench_loader.both_sides(50.0, 5.0) == pytest.approx(40.0)  # 20 + 5 ms per clip
    assert bench_loader.both_sides(50.0, 0.0) == pytest.approx(50.0)  # the worker placement
    assert bench_loader.both_sides(None, 5.0) is None and bench_loader.both_sides(50.0, None) is None


def test_the_json_keeps_every_case_and_a_failing_one_with_its_error(tmp_path):
    path = str(tmp_path / "bench_loader.json")
    report = bench_loader.Report(path, {"machine": "test"})
    assert json.load(open(path))["decode"] == []  # written from the start
    report.case("decode", {"decoder": "a"}, lambda: {"cpu_ms": 1.5})
    failed = report.case("decode", {"decoder": "b"}, lambda: 1 / 0)
    report.case("workers", {"workers": 2}, lambda: {"clips_per_wall_s": 3.0})
    assert failed == {"decoder": "b", "error": "ZeroDivisionError: division by zero"}
    written = json.load(open(path))
    assert written["machine"] == "test"
    assert written["decode"] == [{"decoder": "a", "cpu_ms": 1.5}, failed]
    assert written["workers"] == [{"workers": 2, "clips_per_wall_s": 3.0}]
