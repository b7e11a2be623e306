"""The PNG chart of `marscale compare`: cost per video against top-1, and measured throughput.

Left: counted inference GFLOPs per test video (log scale, every tick labelled with its
value) against published top-1, for the rows that have one; rows without a top-1 are
marked at their cost along the bottom edge (a grey strip when some rows have a top-1 and
some do not), so a cost with no accuracy to set it against is still shown and not placed
at a guessed accuracy. Right: measured training and inference clips/s per row, on the
clock and device they were measured with (CPU time on a CPU), with "not measured" written
where there is no measurement; the legend sits above the bars. The caption names the
activation recomputation the rows were measured with.

matplotlib is imported here only, through its Agg canvas (no display, no global backend).
"""

from __future__ import annotations

import math

from marscale.cost.compare import CompareRow, checkpointing_caption

COLOURS = {"mar": "tab:red", "vit": "tab:blue"}


def log_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
    """Values to label on a log axis from `lo` to `hi` (0 < lo <= hi): 1-2-5 steps; finer
    ones (1-2-3-5, then 1-2-3-4-5-6-8) while fewer than three fit, coarser ones (1-3, whole
    decades, every n-th decade) while more than `max_ticks` do; the two ends, rounded,
    when a short range holds fewer than two."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def steps(subs: tuple[int, ...]) -> list[float]:
        values = (float(f"{m}e{e}") for e in range(first, last + 1) for m in subs)
        return [v for v in values if lo <= v <= hi]

    ticks = steps((1, 2, 5))
    for finer in ((1, 2, 3, 5), (1, 2, 3, 4, 5, 6, 8)):
        if len(ticks) >= 3:
            break
        ticks = steps(finer)
    if len(ticks) < 2:
        return [float(f"{lo:.2g}"), float(f"{hi:.2g}")]
    for coarser in ((1, 3), (1,)):
        if len(ticks) <= max_ticks:
            return ticks
        ticks = steps(coarser)
    return ticks[:: math.ceil(len(ticks) / max_ticks)]


def tick_label(value: float) -> str:
    """A tick's value as a plain number: 0.005, 20, 1,500."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cost_panel(ax, rows: list[CompareRow]) -> None:
    """Counted GFLOPs per video (x, log) against published top-1 (y)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    with_top1 = [r for r in rows if r.published_top1 is not None]
    without = [r for r in rows if r.published_top1 is None]
    for r in with_top1:
        x = r.macs_video / 1e9
        ax.scatter(x, r.published_top1, color=COLOURS[r.arch], s=50, zorder=3)
        ax.annotate(r.label, (x, r.published_top1), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if with_top1:
        low = min(r.published_top1 for r in with_top1) - 1.5
        ax.set_ylim(low - 1.0, max(r.published_top1 for r in with_top1) + 1.0)
        ax.set_ylabel("top-1 % (published)")
    else:
        low = 0.0
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
    for i, r in enumerate(without):
        x = r.macs_video / 1e9
        ax.scatter(x, low, marker="|", s=200, color=COLOURS[r.arch], zorder=3)
        ax.annotate(r.label, (x, low), textcoords="offset points", xytext=(3, 9 + 9 * (i % 3)), fontsize=7,
                    color=COLOURS[r.arch])
    if with_top1 and without:
        # The strip at the bottom holds costs without an accuracy: its tick says so, so no
        # marker there reads as a top-1.
        ticks = [t for t in ax.get_yticks() if low + 0.75 < t < ax.get_ylim()[1]]
        ax.set_yticks(ticks + [low])
        ax.set_yticklabels([f"{t:g}" for t in ticks] + ["no top-1"])
        ax.axhspan(ax.get_ylim()[0], low + 0.6, color="grey", alpha=0.12, lw=0)
        title = "Cost per video vs published top-1\n(grey strip: rows with no top-1 recorded)"
    elif with_top1:
        title = "Cost per video vs published top-1"
    else:
        title = "Cost per video (counted)\nno row has a published top-1 (--top1 LABEL=VALUE adds one)"
    ax.set_title(title, fontsize=10)

    ax.set_xscale("log")
    if rows:
        costs = [r.macs_video / 1e9 for r in rows]
        # Room on the right for the labels written beside the markers.
        lo, hi = min(costs) / 1.3, max(costs) * 1.8
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
        ax.xaxis.set_minor_locator(LogLocator(subs=tuple(range(2, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        views = {r.views for r in rows}
        per = _plural(views.pop(), "view") if len(views) == 1 else "each row's test views"
        ax.set_xlabel(f"inference GFLOPs per video (counted; {per}; log scale)")
    ax.grid(True, which="both", alpha=0.3)


def throughput_label(rows: list[CompareRow]) -> str:
    """The clips/s axis label: the clock and device the rows were measured on."""
    measured = [r.measured for r in rows if r.measured is not None]
    devices = sorted({m.device for m in measured})
    where = devices[0] if len(devices) == 1 else "each row's device"
    clocks = {m.clock for m in measured}
    if clocks == {"cpu"}:
        return f"clips per second of process CPU time ({where}; median step)"
    if clocks == {"wall"}:
        return f"clips/s, wall time on {where} (median step)"
    return "clips/s (median step; see each row's clock in the JSON)" if measured else "clips/s (not measured)"


def _throughput_panel(ax, rows: list[CompareRow]) -> None:
    """Measured training and inference clips/s, one pair of bars per row."""
    y = list(range(len(rows)))
    train = [r.measured.train_clips_per_s if r.measured else 0.0 for r in rows]
    infer = [r.measured.infer_clips_per_s if r.measured else 0.0 for r in rows]
    h = 0.38
    ax.barh([v - h / 2 for v in y], train, height=h, color="tab:orange", label="training clips/s")
    ax.barh([v + h / 2 for v in y], infer, height=h, color="tab:green", label="inference clips/s")
    any_measured = any(r.measured for r in rows)
    top = max(train + infer) if any_measured else 1.0
    for v, r in zip(y, rows):
        if r.measured is None:
            why = f" ({r.not_measured})" if r.not_measured else ""
            ax.text(top * 0.02, v, "not measured" + why, va="center", fontsize=8, color="grey")
    ax.set_yticks(y)
    ax.set_yticklabels([r.label for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(throughput_label(rows))
    devices = sorted({r.measured.device for r in rows if r.measured})
    ax.set_title("Measured throughput" + (f" on {devices[0]}" if len(devices) == 1 else ""), fontsize=10, pad=20)
    if any_measured:
        # Above the plotting area, under the title: no bar can be hidden behind it.
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, borderaxespad=0.2)
        ax.grid(True, axis="x", alpha=0.3)
    else:
        ax.set_xlim(0, top)
        ax.set_xticks([])


def figure(rows: list[CompareRow], reference: CompareRow):
    """The two-panel chart of `rows` as a matplotlib Figure (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    _cost_panel(left, rows)
    _throughput_panel(right, rows)
    fig.text(0.5, 0.01, checkpointing_caption(rows), ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the caption
    return fig


def draw(rows: list[CompareRow], reference: CompareRow, path: str) -> None:
    """Write the two-panel chart of `rows` to `path` (PNG)."""
    figure(rows, reference).savefig(path, dpi=110)
