"""The mask-ratio dial of `marscale eval --mask-ratios`: one set of weights scored at
several evaluation mask ratios, laid out as accuracy against inference cost.

    marscale eval --checkpoint RUN --mask-ratios 0,0.25,0.5,0.75 [--out-dir DIR]

Each ratio is one `evaluate()` pass with `masking.eval_ratio` set to it (a copy of the
masking section; the loaded config is not changed). Ratio 0 shows every token. A model
trained without masking (`masking.kind: none`, the full-token ViT) is masked at ratios
above 0 with cell running masking in the default cell, and the output says so.

Per ratio: visible tokens per view, top-1 / top-5, inference GFLOPs per view counted by
`marscale.cost.counting` on the real modules (multiply-accumulates, the papers' "FLOPs", as
`marscale cost` prints them), its share of the same model's full-token cost, and the
measured throughput (views scored per second of wall time of the pass, each rank's first
batch excluded as warm-up). The main rank prints the table as Markdown and writes
`eval_ratios.{md,csv,json,png}` (the plot: top-1 and top-5 against GFLOPs per view on a
fixed 0-100% axis with chance marked, the mask ratios along the top).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import platform
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist

from marscale.core import dist
from marscale.core.clip import token_grid
from marscale.commands.cost import UNIT_NOTE
from marscale.core.config import to_dict
from marscale.cost.counting import count_visible
from marscale.engine.evaluate import EvalResult, Forward, evaluate
from marscale.core.io import atomic_write_bytes, write_json
from marscale.tokens.masking import MaskingConfig

if TYPE_CHECKING:
    from marscale.engine.config import TrainConfig
    from marscale.engine.plan import RunPlan

logger = logging.getLogger(__name__)

FILE_STEM = "eval_ratios"
"""Name of the default output folder and of each file in it (.md, .csv, .json, .png)."""
DEFAULT_CELL = MaskingConfig().cell
"""The cell used to mask a model trained without masking (the masking section's default)."""
THROUGHPUT_NOTE = (
    "clips/s: views scored per second of wall time of that ratio's pass (decoding, transfer and "
    "scoring, all ranks), from the end of each rank's first batch (warm-up, left out) to the end "
    "of the pass"
)
THROUGHPUT_FALLBACK_NOTE = "whole pass, warm-up included: no rank scored a second batch"


@dataclasses.dataclass(frozen=True)
class RatioPass:
    """One evaluation pass of the dial: its masking section and its cost per view."""

    mask_ratio: float
    masking: MaskingConfig
    """The config's masking section with eval_ratio = mask_ratio (and, for a model trained
    without masking, cell running masking)."""
    tokens: int
    visible_tokens: int
    """Tokens the encoder sees per view (from the evaluation mask itself)."""
    macs_view: int
    """Inference multiply-accumulates per view: encoder + classifier, and the complementary
    pass too when masking.eval_complement is on."""
    view_vs_full: float
    """macs_view / the same model's with every token visible."""


@dataclasses.dataclass(frozen=True)
class Throughput:
    clips_per_s: float
    """Views scored per second of wall time (`THROUGHPUT_NOTE`)."""
    views: int
    """Views timed: all ranks, without each rank's warm-up batch."""
    seconds: float
    """Longest timed span of any rank."""
    warmup_excluded: bool
    """False when no rank scored a second batch: then the whole pass is timed."""


@dataclasses.dataclass(frozen=True)
class RatioRow:
    """One line of the table: a pass, its result and its speed."""

    plan: RatioPass
    result: EvalResult
    speed: Throughput


# ------------------------------------------------------------------- ratios and cost


def parse_ratios(text: str) -> list[float]:
    """`0,0.25,0.5` -> [0.0, 0.25, 0.5]; each a number in [0, 1), none twice."""
    ratios = []
    for item in (s.strip() for s in text.split(",")):
        try:
            ratio = float(item)
        except ValueError:
            raise ValueError(f"--mask-ratios {text}: {item!r} is not a number") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(
                f"--mask-ratios {text}: ratio {item} is outside [0, 1) (0 shows every token; 1 would show none)"
            )
        if ratio in ratios:
            raise ValueError(f"--mask-ratios {text}: ratio {item} is listed twice")
        ratios.append(ratio)
    return ratios


def substituted_masking(masking: MaskingConfig) -> bool:
    """Whether ratios above 0 bring a masking kind the model was not trained with."""
    return masking.kind == "none"


def masking_for(masking: MaskingConfig, ratio: float) -> MaskingConfig:
    """The masking section of the pass at `ratio` (a copy; MaskingConfig checks the ratio)."""
    if substituted_masking(masking):
        if ratio == 0:
            return masking
        return dataclasses.replace(masking, kind="cell_running", cell=DEFAULT_CELL, ratio=ratio, eval_ratio=ratio)
    return dataclasses.replace(masking, eval_ratio=ratio)


def plan_passes(cfg: TrainConfig, ratios: list[float]) -> list[RatioPass]:
    """The passes at `ratios` (from `parse_ratios`) for config `cfg`, every ratio checked
    (and counted) before any is run. Raises ValueError naming the first that does not fit."""
    grid = token_grid(cfg.clip, cfg.model.patch_size)
    tokens = grid[0] * grid[1] * grid[2]
    full = count_visible(cfg.model, cfg.clip, tokens).macs_inference
    passes = []
    for ratio in ratios:
        try:
            masking = masking_for(cfg.masking, ratio)
            masking.check_grid(grid)
            visible = masking.visible(grid, masking.ratio_at(train=False))
        except ValueError as e:
            raise ValueError(f"--mask-ratios: ratio {ratio:g} does not fit this model: {e}") from None
        macs = count_visible(cfg.model, cfg.clip, visible).macs_inference
        if masking.eval_complement and visible < tokens:
            macs += count_visible(cfg.model, cfg.clip, tokens - visible).macs_inference
        passes.append(RatioPass(ratio, masking, tokens, visible, macs, macs / full))
    return passes


# ---------------------------------------------------------------------- evaluation


class WarmupTimer:
    """Wraps a `Forward` and notes when its first batch (the warm-up) has been scored."""

    def __init__(self, forward: Forward, device: torch.device, calls_per_batch: int):
        self.forward = forward
        self.device = device
        self.calls_per_batch = calls_per_batch  # 2 with the complementary pass
        self.calls = 0
        self.warmup_views = 0
        self.warmup_end: float | None = None

    def __call__(self, x: torch.Tensor, tokens):
        logits = self.forward(x, tokens)
        self.calls += 1
        if self.calls == 1:
            self.warmup_views = x.shape[0]
        if self.calls == self.calls_per_batch:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the warm-up's kernels finish inside it
            self.warmup_end = time.perf_counter()
        return logits


def _throughput(timer: WarmupTimer, result: EvalResult, end: float, device: torch.device) -> Throughput:
    """Collective: views after each rank's warm-up batch / the longest timed span of a rank."""
    warmup_views = torch.tensor([float(timer.warmup_views)], dtype=torch.float64, device=device)
    span = torch.tensor([end - timer.warmup_end if timer.warmup_end is not None else 0.0], dtype=torch.float64,
                        device=device)
    if dist.is_initialized():
        torch_dist.all_reduce(warmup_views)
        torch_dist.all_reduce(span, op=torch_dist.ReduceOp.MAX)
    views, seconds = result.num_views - int(warmup_views.item()), float(span.item())
    if views > 0 and seconds > 0:
        return Throughput(views / seconds, views, seconds, True)
    return Throughput(result.num_views / result.seconds, result.num_views, result.seconds, False)


def evaluate_ratios(
    forward: Forward,
    cfg: TrainConfig,
    plan: RunPlan,
    passes: list[RatioPass],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> list[RatioRow]:
    """Score the evaluation set once per pass with the same weights (collective)."""
    rows = []
    for p in passes:
        timer = WarmupTimer(forward, device, 2 if p.masking.eval_complement and p.mask_ratio > 0 else 1)
        result = evaluate(
            timer, cfg.data, cfg.clip, p.masking, plan.val_set, plan.token_grid, plan.num_classes,
            device=device, dtype=dtype,
        )
        speed = _throughput(timer, result, time.perf_counter(), device)
        logger.info(
            "mask ratio %g: top-1 %.2f top-5 %.2f, %d of %d tokens visible, %s GFLOPs/view, %.1f clips/s",
            p.mask_ratio, result.top1, result.top5, p.visible_tokens, p.tokens, _gflops(p.macs_view),
            speed.clips_per_s,
        )
        rows.append(RatioRow(p, result, speed))
    return rows


# ------------------------------------------------------------------------- output


def _gflops(macs: int) -> str:
    g = macs / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.3g}"


_COLUMNS = ("mask ratio", "visible tokens/view", "top-1 %", "top-5 %", "GFLOPs/view (MACs)", "of full", "clips/s")


def _cells(row: RatioRow) -> list[str]:
    p = row.plan
    return [
        f"{p.mask_ratio:g}",
        f"{p.visible_tokens}/{p.tokens}",
        f"{row.result.top1:.2f}",
        f"{row.result.top5:.2f}",
        _gflops(p.macs_view),
        f"{p.view_vs_full:.1%}",
        f"{row.speed.clips_per_s:.1f}",
    ]


def notes(rows: list[RatioRow], masking: MaskingConfig) -> list[str]:
    """What the columns count, and what the table changed about the model's masking."""
    lines = [
        f"GFLOPs/view: inference per view (encoder + classifier), counted by marscale.cost.counting; {UNIT_NOTE}.",
        "of full: GFLOPs/view against the same model with every token visible (ratio 0).",
        THROUGHPUT_NOTE + ("" if all(r.speed.warmup_excluded for r in rows) else f" ({THROUGHPUT_FALLBACK_NOTE})")
        + ".",
    ]
    if substituted_masking(masking):
        cell = "x".join(map(str, DEFAULT_CELL))
        lines.append(
            f"masking.kind is none (the model was trained on every token): ratios above 0 mask with cell "
            f"running masking in {cell} cells (the evaluation pattern), which this model never saw in training."
        )
    elif masking.kind == "cell_running":
        lines.append("Masks: cell running masking, the fixed evaluation pattern (masking.eval_ratio per row).")
    else:
        lines.append(f"Masks: {masking.kind} masking at masking.eval_ratio per row.")
    if masking.eval_complement:
        lines.append("masking.eval_complement: each masked view is scored twice (mask and complement); "
                     "GFLOPs/view counts both passes.")
    return lines


def format_markdown(rows: list[RatioRow], cfg: TrainConfig, checkpoint: str, folder: str | None) -> str:
    used = "" if folder is None or os.path.samefile(folder, checkpoint) else f" ({os.path.basename(folder)})"
    head = [
        "# Accuracy against compute by evaluation mask ratio",
        "",
        f"checkpoint: `{checkpoint}`{used}  ",
        f"model: {cfg.model.arch} {cfg.model.variant}, {cfg.model.num_classes} classes; clip "
        f"{cfg.clip.num_frames}x{cfg.clip.img_size}x{cfg.clip.img_size}; "
        f"{cfg.data.test_num_clips}x{cfg.data.test_num_crops} views per video, "
        f"{rows[0].result.expected_videos} videos",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    table = ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(head + table + [""] + [f"- {n}" for n in notes(rows, cfg.masking)]) + "\n"


def _csv_record(row: RatioRow) -> dict:
    p = row.plan
    return {
        "mask_ratio": p.mask_ratio,
        "tokens": p.tokens,
        "visible_tokens": p.visible_tokens,
        "top1": row.result.top1,
        "top5": row.result.top5,
        "macs_view": p.macs_view,
        "gflops_view": p.macs_view / 1e9,
        "view_vs_full": p.view_vs_full,
        "clips_per_s": row.speed.clips_per_s,
        "timed_views": row.speed.views,
        "timed_seconds": row.speed.seconds,
        "warmup_excluded": row.speed.warmup_excluded,
    }


def format_csv(rows: list[RatioRow]) -> str:
    records = []
    for r in rows:
        result = r.result.to_dict()
        result.pop("skipped_samples")  # a dict: in the JSON file
        records.append({**_csv_record(r), **result})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def json_record(
    rows: list[RatioRow], cfg: TrainConfig, checkpoint: str, folder: str | None, device: torch.device
) -> dict:
    """The JSON file: where the weights came from, the config and machine, and every row."""
    tree = to_dict(cfg)
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_folder": None if folder is None else os.path.abspath(folder),
        "config": {
            "model": {k: tree["model"][k] for k in ("arch", "variant", "num_classes")},
            "clip": tree["clip"],
            # Without eval_ratio: each row holds the masking section of its own pass.
            "masking": {k: v for k, v in tree["masking"].items() if k != "eval_ratio"},
            "data": {k: tree["data"][k] for k in ("val_shards", "test_num_clips", "test_num_crops", "eval_batch_size")},
            "precision": cfg.deepspeed.precision,
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": dist.get_world_size(),
        "torch": torch.__version__,
        "unit": "macs_view: multiply-accumulates per view at inference (the papers' FLOPs); "
                "gflops_view = macs_view / 1e9; hardware FLOPs = 2 x MACs",
        "notes": notes(rows, cfg.masking),
        "ratios": [
            {**_csv_record(r), "masking": to_dict(r.plan.masking), **r.result.to_dict()} for r in rows
        ],
    }


def plot_figure(rows: list[RatioRow], title: str, num_classes: int):
    """Top-1 and top-5 against GFLOPs per view on a fixed 0-100% axis with chance marked
    (a dial over a few videos jumps in whole videos; a zoomed axis would make that a cliff);
    each point carries its value, the mask ratios are the top axis. A matplotlib Figure."""
    # The Agg canvas on a Figure of its own: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = sorted(rows, key=lambda r: r.plan.macs_view)  # lines run along the cost axis
    x = [r.plan.macs_view / 1e9 for r in rows]
    top1 = [r.result.top1 for r in rows]
    top5 = [r.result.top5 for r in rows]
    k = min(5, num_classes)
    ax.plot(x, top1, "o-", color="tab:blue", label="top-1", zorder=3)
    ax.plot(x, top5, "s--", color="tab:orange", label=f"top-{k}", zorder=3)
    # Values: top-k above its point, top-1 below its own, so the two never cover each
    # other; one label where they are equal (both points sit there).
    for xi, a, b in zip(x, top1, top5):
        if f"{a:.1f}" == f"{b:.1f}":
            ax.annotate(f"{a:.1f} (both)", (xi, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
            continue
        ax.annotate(f"{b:.1f}", (xi, b), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8,
                    color="tab:orange")
        ax.annotate(f"{a:.1f}", (xi, a), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=8,
                    color="tab:blue")
    chance = 100.0 / num_classes
    ax.axhline(chance, color="grey", lw=1, ls=":", label=f"chance top-1 (1 of {num_classes}: {chance:.3g}%)")
    if k < num_classes:
        ax.axhline(100.0 * k / num_classes, color="grey", lw=1, ls="-.", alpha=0.7,
                   label=f"chance top-{k} ({100.0 * k / num_classes:.3g}%)")
    ax.set_ylim(-8, 108)  # room for the labels below 0% and above 100%
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("GFLOPs per view (1e9 multiply-accumulates, inference)")
    span = (max(x) - min(x)) or max(x) or 1.0
    ax.set_xlim(min(x) - 0.08 * span, max(x) + 0.08 * span)
    ratios = ax.secondary_xaxis("top")
    ratios.set_xticks(x, labels=[f"{r.plan.mask_ratio:g}" for r in rows], fontsize=8)
    ratios.set_xlabel("evaluation mask ratio", fontsize=8)
    videos = max(r.result.num_videos for r in rows)
    ax.set_title(f"{title} ({videos} video{'' if videos == 1 else 's'} scored)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_png(rows: list[RatioRow], title: str, num_classes: int) -> bytes:
    """`plot_figure` as PNG bytes."""
    buf = io.BytesIO()
    plot_figure(rows, title, num_classes).savefig(buf, format="png")
    return buf.getvalue()


def default_out_dir(checkpoint: str, folder: str | None) -> str:
    """RUN/eval_ratios for a checkpoint folder (RUN holds checkpoints/step-N), else ./eval_ratios."""
    from marscale.checkpoints.folders import CHECKPOINT_SUBDIR

    if folder is None:
        return FILE_STEM
    parent = os.path.dirname(os.path.abspath(folder))
    run = os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINT_SUBDIR else parent
    return os.path.join(run, FILE_STEM)


def report(
    rows: list[RatioRow], cfg: TrainConfig, checkpoint: str, folder: str | None, device: torch.device, out_dir: str
) -> None:
    """Print the table and write eval_ratios.{md,csv,json,png} into `out_dir` (main rank)."""
    markdown = format_markdown(rows, cfg, checkpoint, folder)
    print(markdown, end="")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, FILE_STEM)
    atomic_write_bytes(base + ".md", markdown.encode())
    atomic_write_bytes(base + ".csv", format_csv(rows).encode())
    write_json(base + ".json", json_record(rows, cfg, checkpoint, folder, device))
    title = f"{os.path.basename(os.path.normpath(checkpoint))}: {cfg.model.arch} {cfg.model.variant}"
    atomic_write_bytes(base + ".png", plot_png(rows, title, cfg.model.num_classes))
    print(f"\nwrote {base}.md, .csv, .json, .png")
