"""The PNG chart of `marscale compare`: cost per video against top-1, and measured throughput.

Left: counted inference GFLOPs per test video (log scale) against published top-1, for
the rows that have one; rows without a top-1 are marked at their cost along the bottom
edge, so a cost with no accuracy to set it against is still shown and not placed at a
guessed accuracy. Right: measured training and inference clips/s per row, with "not
measured" written where there is no measurement. The caption names the activation
recomputation the rows were measured with.

matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from marscale.cost.compare import CompareRow, checkpointing_caption


def draw(rows: list[CompareRow], reference: CompareRow, path: str) -> None:
    """Write the two-panel chart of `rows` to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.2]})
    colours = {"mar": "tab:red", "vit": "tab:blue"}

    with_top1 = [r for r in rows if r.published_top1 is not None]
    without = [r for r in rows if r.published_top1 is None]
    for r in with_top1:
        x = r.macs_video / 1e9
        left.scatter(x, r.published_top1, color=colours[r.arch], s=50, zorder=3)
        left.annotate(r.label, (x, r.published_top1), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if with_top1:
        low = min(r.published_top1 for r in with_top1) - 1.5
        left.set_ylim(low - 1.0, max(r.published_top1 for r in with_top1) + 1.0)
    else:
        low = 0.0
        left.set_ylim(-1, 1)
        left.set_yticks([])
    for i, r in enumerate(without):
        x = r.macs_video / 1e9
        left.scatter(x, low, marker="|", s=200, color=colours[r.arch], zorder=3)
        left.annotate(r.label, (x, low), textcoords="offset points", xytext=(3, 6 + 9 * (i % 3)), fontsize=7,
                      rotation=0, color=colours[r.arch])
    if with_top1 and without:
        # The strip at the bottom holds costs without an accuracy: its tick says so, so no
        # marker there reads as a top-1.
        ticks = [t for t in left.get_yticks() if low + 0.75 < t < left.get_ylim()[1]]
        left.set_yticks(ticks + [low])
        left.set_yticklabels([f"{t:g}" for t in ticks] + ["no top-1"])
        left.axhspan(left.get_ylim()[0], low + 0.6, color="grey", alpha=0.12, lw=0)
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel(f"inference GFLOPs per video (counted; {rows[0].views} views)" if rows else "GFLOPs per video")
    left.set_ylabel("top-1 % (published)")
    left.set_title("Cost per video vs published top-1\n(grey strip: rows with no top-1 recorded)", fontsize=10)
    left.grid(True, which="both", alpha=0.3)

    names = [r.label for r in rows]
    y = list(range(len(rows)))
    train = [r.measured.train_clips_per_s if r.measured else 0.0 for r in rows]
    infer = [r.measured.infer_clips_per_s if r.measured else 0.0 for r in rows]
    h = 0.38
    right.barh([v - h / 2 for v in y], train, height=h, color="tab:orange", label="training clips/s")
    right.barh([v + h / 2 for v in y], infer, height=h, color="tab:green", label="inference clips/s")
    top = max(train + infer + [1e-9])
    for v, r in zip(y, rows):
        if r.measured is None:
            right.text(top * 0.02, v, "not measured", va="center", fontsize=8, color="grey")
    right.set_yticks(y)
    right.set_yticklabels(names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("clips/s (measured, median step)")
    measured = next((r.measured for r in rows if r.measured), None)
    device = f" on {measured.device}" if measured else ""
    right.set_title(f"Measured throughput{device}", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    right.grid(True, axis="x", alpha=0.3)

    fig.text(0.5, 0.01, checkpointing_caption(rows), ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the caption
    fig.savefig(path, dpi=110)
    plt.close(fig)
