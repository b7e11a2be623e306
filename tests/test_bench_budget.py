"""benchmarks/bench_budget.py: the counted spread of a step's cost under each batching, and
two measured steps of each at the demo's shapes (a check of the code path, not a timing)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def bench():
    module = load_benchmark("bench_budget", "bench_budget_case")
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_counted_spread_and_measured_steps_at_demo_shapes(bench, tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert bench.main(["--shapes", "demo", "--clips-per-video", "1", "--steps", "600", "--measure-steps", "2",
                       "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["counted"]["demo/1"]
    assert [rows[name]["token_budget"] for name in bench.BATCHINGS] == [None, 512, 556]
    # 8 clips of 64 visible tokens; 8 x 1.60 GFLOP = 556 tokens of 25%-masked clips (2.21 GFLOP per 96)
    assert rows["fixed"]["mean_clips"] == 8
    assert rows["fixed"]["cv"] == pytest.approx(0.108, abs=0.01)
    assert rows["visible"]["cv"] == pytest.approx(0.062, abs=0.01)
    assert rows["cost"]["cv"] == pytest.approx(0.049, abs=0.01)
    cap = 556 * 2.213022 / 96  # GFLOP: never over the budget
    assert rows["cost"]["max_gflop"] <= cap < rows["visible"]["max_gflop"]
    measured = report["measured"]["batchings"]
    for name in bench.BATCHINGS:
        assert len(measured[name]["step_s"]) == 2 and measured[name]["median_s"] > 0
    assert max(measured["cost"]["gflop"]) <= cap  # the steps ran the plan's batches
    printed = capsys.readouterr().out
    assert "measured training steps at demo shapes" in printed and "least squares" in printed
