"""marscale.cost.chart (the `marscale compare` PNG) and the `eval --mask-ratios` chart: what
a reader sees: labelled log ticks, titles that describe what is drawn, a legend clear of
the bars, the clock of the throughput axis, a fixed 0-100% accuracy axis."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from marscale.commands import eval_ratios
from marscale.cost import chart
from marscale.cost.compare import Entry, counted_row
from marscale.engine.evaluate import EvalResult
from marscale.tokens.masking import MaskingConfig

# The demo model at three token counts (counting it is quick): MAR 50%, MAR 75%, full.
ENTRIES = ("demo", "demo:masking.ratio=0.75", "demo:model.arch=vit:masking.kind=none:model.decoder.enabled=false")


@pytest.fixture(scope="module")
def rows():
    return [counted_row(Entry.parse(e), Entry.parse(e).load(), 1000, {}, "none") for e in ENTRIES]


def _measured(rows, device="CPU, 1 thread", clock="cpu"):
    out = [dataclasses.replace(r) for r in rows]
    for i, r in enumerate(out):
        r.measured = SimpleNamespace(train_clips_per_s=30.0 + i, infer_clips_per_s=450.0 + 40 * i,
                                     device=device, clock=clock)
    return out


def _drawn(rows):
    fig = chart.figure(rows, rows[-1])
    fig.canvas.draw()  # tick labels exist once drawn
    return fig.axes[0], fig.axes[1], fig


def test_log_ticks_are_plain_readable_values():
    assert chart.log_ticks(0.0055, 0.04) == [0.01, 0.02, 0.03]  # 1-2-5 gives two: finer steps
    assert chart.log_ticks(473, 32000) == [500, 1000, 2000, 5000, 10000, 20000]
    assert chart.log_ticks(100, 100000) == [100, 300, 1000, 3000, 10000, 30000, 100000]  # 1-3 past 7 ticks
    assert chart.log_ticks(1, 1e9) == [1, 100, 1e4, 1e6, 1e8]  # every other decade
    assert chart.log_ticks(5.5, 6.5) == [5.5, 6.5]  # no round value inside: the ends
    assert [chart.tick_label(v) for v in (0.005, 20, 1500, 20000)] == ["0.005", "20", "1,500", "20,000"]


def test_quick_chart_reads(rows):
    # As `marscale compare --quick`: no published top-1, one view, measured on the CPU.
    left, right, fig = _drawn(_measured(rows))
    labels = [t.get_text() for t in left.get_xticklabels() if t.get_text()]
    lo, hi = left.get_xlim()
    assert len(labels) >= 2 and labels == [chart.tick_label(v) for v in chart.log_ticks(lo, hi)]
    assert all(lo <= r.macs_video / 1e9 <= hi for r in rows)
    assert "grey strip" not in left.get_title() and "no row has a published top-1" in left.get_title()
    assert not left.patches  # no strip drawn
    assert "(counted; 1 view; log scale)" in left.get_xlabel()
    assert right.get_xlabel() == "clips per second of process CPU time (CPU, 1 thread; median step)"
    assert right.get_title() == "Measured throughput on CPU, 1 thread"
    # The legend lies above the plotting area, so it covers no bar.
    renderer = fig.canvas.get_renderer()
    assert right.get_legend().get_window_extent(renderer).y0 >= right.get_window_extent(renderer).y1 - 1
    assert not fig.axes[1].texts  # every row measured: no "not measured"


def test_published_top1_and_rows_without_one(rows):
    mixed = [dataclasses.replace(r, published_top1=t) for r, t in zip(rows, (None, None, 81.5))]
    left, right, _ = _drawn(mixed)
    assert "grey strip" in left.get_title() and len(left.patches) == 1
    assert [t.get_text() for t in left.get_yticklabels()][-1] == "no top-1"
    assert right.get_xlabel() == "clips/s (not measured)" and not right.get_xticks().size
    assert {t.get_text() for t in right.texts} == {"not measured"}
    every = [dataclasses.replace(r, published_top1=t) for r, t in zip(rows, (80.0, 79.0, 81.5))]
    left, _, _ = _drawn(_measured(every, "NVIDIA H100 80GB HBM3", "wall"))
    assert left.get_title() == "Cost per video vs published top-1" and not left.patches
    assert _drawn(_measured(every, "NVIDIA H100 80GB HBM3", "wall"))[1].get_xlabel() == (
        "clips/s, wall time on NVIDIA H100 80GB HBM3 (median step)")
    views = [dataclasses.replace(r, views=15) for r in rows]
    assert "(counted; 15 views; log scale)" in _drawn(views)[0].get_xlabel()


def _ratio_rows(points, gflops):
    out = []
    for (ratio, top1, top5), g in zip(points, gflops):
        plan = eval_ratios.RatioPass(ratio, MaskingConfig(), 128, round(128 * (1 - ratio)), round(g * 1e9), 1.0)
        result = EvalResult(top1, top5, 1, 1, 1, 0, {}, 1.0)
        out.append(eval_ratios.RatioRow(plan, result, eval_ratios.Throughput(10.0, 1, 0.1, True)))
    return out


def test_mask_ratio_chart_has_a_fixed_axis_and_one_label_where_top1_meets_top5():
    # One video: each accuracy is 0 or 100; a zoomed axis would turn that into a cliff.
    rows = _ratio_rows([(0, 100.0, 100.0), (0.5, 100.0, 100.0), (0.75, 0.0, 100.0)], [0.58, 0.29, 0.16])
    fig = eval_ratios.plot_figure(rows, "demo", num_classes=4)
    ax = fig.axes[0]
    assert ax.get_ylim() == (-8, 108) and list(ax.get_yticks()) == [0, 20, 40, 60, 80, 100]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.0", "100.0", "100.0 (both)", "100.0 (both)"]  # one label where equal
    assert ax.get_title() == "demo (1 video scored)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["top-1", "top-4", "chance top-1 (1 of 4: 25%)"]  # 4 classes: top-4 is 100%
    (ratios,) = ax.child_axes  # the mask ratios along the top, cheapest first
    assert [t.get_text() for t in ratios.get_xticklabels()] == ["0.75", "0.5", "0"]
    png = eval_ratios.plot_png(rows, "demo", num_classes=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
