"""benchmarks/bench_packing.py keeps every row whatever fails: a packed backend that raises
is recorded in its row and the others are timed; the JSON is written also when the run is
interrupted. Demo shapes, batch 3, one repeat, two batch compositions."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark

from marscale.model import MARModel

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("bench_packing", "bench_packing_case")
    compositions = module.compositions
    monkeypatch.setattr(module, "compositions", lambda batch: compositions(batch)[:2])  # no padding, then some
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


ARGS = ["--device", "cpu", "--shapes", "demo", "--repeats", "1", "--batch", "3"]


def test_a_failing_backend_is_recorded_and_the_others_timed(bench, monkeypatch, tmp_path):
    # "broken" runs per_clip's kernel but its step raises, as a GPU kernel refusing its input would.
    chosen = {}
    set_attention, packed_step = MARModel.set_attention, bench.packed_step

    def choose(self, name, device):
        chosen["name"] = name
        set_attention(self, "per_clip" if name == "broken" else name, device)

    def step(model, *args):
        if chosen["name"] == "broken":
            raise RuntimeError("CUDA error: misaligned address\nCompile with TORCH_USE_CUDA_DSA")
        return packed_step(model, *args)

    monkeypatch.setattr(MARModel, "set_attention", choose)
    monkeypatch.setattr(bench, "packed_step", step)
    monkeypatch.setattr(bench, "backends", lambda device: ["per_clip", "broken"])
    out = tmp_path / "packing.json"
    assert bench.main([*ARGS, "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    rows = doc["results"]["demo"]["rows"]
    assert [r["batch"] for r in rows] == ["all 50%", "one 50% among 25%"]
    for r in rows:
        assert r["broken_error"] == "RuntimeError: CUDA error: misaligned address" and "broken_s" not in r
        assert r["padded_s"] > 0 and r["per_clip_s"] > 0 and r["best_packed"] == "per_clip"
        assert r["speedup"] == pytest.approx(r["padded_s"] / r["per_clip_s"])
    assert doc["results"]["demo"]["crossover"].startswith("packing")


def test_an_interrupted_run_writes_the_rows_so_far(bench, monkeypatch, tmp_path):
    timed, calls = bench.timed, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:  # the second batch's padded step (each batch: padded, per_clip, sdpa_mask)
            raise KeyboardInterrupt
        return timed(*args)

    monkeypatch.setattr(bench, "timed", interrupted)
    out = tmp_path / "packing.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main([*ARGS, "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] is False
    first, second = doc["results"]["demo"]["rows"]
    assert first["speedup"] > 0 and "padded_s" not in second
