"""The MAR experiment in miniature, on a CPU: a larger MAR model at 50% mask against a
smaller full-token model, same recipe and steps, three seeds each, accuracy set beside
counted and measured cost.

    python benchmarks/compare_mini.py [--out runs/compare_mini] [--steps 300] [--seeds 0 1 2] [--models NAME ...]
    make compare-mini

The paper's claim is an accuracy-for-cost trade: feeding a larger encoder only half of
the tokens (MAR) buys more accuracy per FLOP than a smaller encoder on every token. The
miniature, at a size a 2-core CPU trains in minutes:

    MAR ViT-Ti 50%   6 x 192, cell running masking 50%, decoder + bridging classifier
    ViT-Mi full      4 x 128 (`vit_micro`), every token, mean pool + head (VideoMAE baseline)
    ViT-Ti full      6 x 192, every token: the ceiling, the larger model without masking
    MAR ViT-Mi 50%   4 x 128 at 50%: the paper's own direction (MAR ViT-L against full
                     ViT-H), the smaller model masked against the larger one on every token

all trained from scratch with configs/demo.yaml's recipe (AdamW lr 1e-3, half an epoch of
warm-up then cosine, fp32, ZeRO-2) at batch 16 (8 videos x 2 clips) for the same number of
steps, once per seed (`run.seed`; the data are the same for every seed), and evaluated on
held-out clips.

The data are `marscale-shards synth --task motion`: 8 classes, the direction (45 degrees
apart) in which 3 of 4 objects drift, over a textured background with pixel noise,
sizes and speeds varied, the frame a torus. No single frame says the class (every frame's
content has the same distribution for every class), so a model must use time; the demo's
set saturates (every model reaches 96-100%) and says nothing about the trade.
8 frames of 64 x 64 (64 tokens; 32 x 32 would leave a 2 x 2 token grid, too coarse for
2 x 2 masking cells).

Steps, each through the project's own commands (so this also checks them end to end):
    1. python -m shards_tools.cli synth --task motion   training + validation shards
    2. python -m marscale.cli train       each model x seed, one run at a time (training
                                          ends with evaluation: top-1 on the held-out set)
    3. python -m marscale.cli compare     the same configs on the engine with synthetic
                                          tensors: training and inference time per clip
                                          (process CPU time, one thread) beside counted FLOPs
    4. the table (Markdown), JSON and chart (PNG) in --out: top-1 (mean, std, each seed)
       against measured training and inference cost, counted GFLOPs beside
The wall and CPU time of every step above (all child processes) is recorded: on a shared
machine the wall time says more about the neighbours than about the models.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASK = "motion"
NUM_CLASSES = 8
SIZE = 64
SOURCE_FRAMES = 16
BATCH = 16
CLIP = ["clip.num_frames=8", f"clip.img_size={SIZE}", f"data.short_side={SIZE}"]
# The recipe every model shares (configs/demo.yaml plus these).
RECIPE = [*CLIP, f"model.num_classes={NUM_CLASSES}", "checkpoint.every_steps=0", "checkpoint.save_at_end=false",
          "logging.every_steps=25", "logging.tensorboard=false", "run.eval_every_steps=0", "optim.warmup_epochs=0.5",
          f"data.batch_size={BATCH}"]
FULL = ["model.arch=vit", "masking.kind=none", "model.decoder.enabled=false"]
# The comparison (the first two), the ceiling (the third) and the paper's direction (the last).
MODELS = {
    "MAR ViT-Ti 50%": ["model.variant=vit_tiny"],
    "ViT-Mi full": ["model.variant=vit_micro", *FULL],
    "ViT-Ti full": ["model.variant=vit_tiny", *FULL],
    "MAR ViT-Mi 50%": ["model.variant=vit_micro"],
}
PAIRS = (("MAR ViT-Ti 50%", "ViT-Mi full"), ("MAR ViT-Ti 50%", "ViT-Ti full"), ("MAR ViT-Mi 50%", "ViT-Ti full"))
"""Rows set against each other under the table (MAR first), where both were run."""
COLOURS = {"MAR ViT-Ti 50%": "tab:red", "ViT-Mi full": "tab:blue", "ViT-Ti full": "tab:grey",
           "MAR ViT-Mi 50%": "tab:orange"}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: Path) -> dict[str, float]:
    """Run `command` in the repository with its output in `log`; returns its wall and CPU
    seconds (user + system of the process and its children)."""
    print("$", " ".join(command), flush=True)
    wall, cpu = time.perf_counter(), children_cpu_s()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}), see {log}")
    return {"wall_s": time.perf_counter() - wall, "cpu_s": children_cpu_s() - cpu}


def prepare(out: Path, per_class: int, val_per_class: int) -> tuple[dict[str, Path], dict[str, float]]:
    data = out / "data"
    shards = {s: data / "shards" / s for s in ("train", "val")}
    times = {"wall_s": 0.0, "cpu_s": 0.0}
    if not all((p / "manifest.json").is_file() for p in shards.values()):
        times = run([sys.executable, "-m", "shards_tools.cli", "synth", "--task", TASK, "--out", str(data),
                     "--videos-per-class", str(per_class), "--val-videos-per-class", str(val_per_class),
                     "--size", f"{SIZE}x{SIZE}", "--frames", str(SOURCE_FRAMES), "--seed", "0", "--workers", "2",
                     "--shards", "--samples-per-shard", "16"], out / "synth.log")
    return shards, times


def train(out: Path, name: str, overrides: list[str], seed: int, shards: dict[str, Path], steps: int) -> dict:
    run_dir = out / f"{name.replace(' ', '_').replace('%', '')}_seed{seed}"
    sets = [*RECIPE, *overrides, f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
            f"run.output_dir={run_dir}", f"run.max_steps={steps}", f"run.name={run_dir.name}", f"run.seed={seed}"]
    if (run_dir / "eval.json").is_file() and (run_dir / "times.json").is_file():
        times = json.loads((run_dir / "times.json").read_text())  # finished earlier: --out resumes
    else:
        times = run([sys.executable, "-m", "marscale.cli", "train", "--config", "demo",
                     *[a for s in sets for a in ("--set", s)]], out / f"{run_dir.name}.log")
        (run_dir / "times.json").write_text(json.dumps(times) + "\n")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "name": name, "seed": seed, "overrides": overrides, "run_dir": str(run_dir), **times,
        "top1": evaluation["top1"], "top5": evaluation["top5"], "videos": evaluation["num_videos"],
        "step_wall_s": statistics.median(m["step_time_s"] for m in metrics if "step_time_s" in m),
        "train_losses": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
        "clips_per_step": plan["clips_per_step"], "flops_per_train_clip": plan["flops_per_clip_train"],
        "macs_per_view": plan["macs_per_view_eval"],
    }


def measure(out: Path, steps: int, models: list[str]) -> tuple[dict[str, dict], dict[str, float]]:
    """`marscale compare` on the configs (the engine, synthetic tensors, the training batch)."""
    entries = [":".join(["demo", *RECIPE, *MODELS[name]]) for name in models]
    folder = out / "engine"
    reference = entries[min(1, len(entries) - 1)]  # the smaller full model when all run
    times = run([sys.executable, "-m", "marscale.cli", "compare", *entries, "--reference", reference,
                 "--batch", str(BATCH), "--steps", str(steps), "--warmup", "1", "--budget-min", "30",
                 "--train-videos", "1600", "--out", str(folder)], out / "compare.log")
    rows = json.loads((folder / "compare.json").read_text())["rows"]
    return {name: row for name, row in zip(models, rows)}, times


def summarise(runs: list[dict], engine: dict[str, dict]) -> dict[str, dict]:
    """Per model: top-1 over seeds (mean, sample std, each seed) and its costs."""
    out = {}
    for name in engine:
        mine = [r for r in runs if r["name"] == name]
        top1 = [r["top1"] for r in mine]
        e = engine[name]
        out[name] = {
            "seeds": [r["seed"] for r in mine], "top1": top1, "top1_mean": statistics.mean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "params": e["params_training"],
            "train_gflop_clip": mine[0]["flops_per_train_clip"] / 1e9,
            "infer_gflop_view": 2 * mine[0]["macs_per_view"] / 1e9,
            "train_ms_clip": e["train_step_median_s"] / e["batch"] * 1e3,
            "infer_ms_view": 1e3 / e["infer_clips_per_s"],
            "run_step_wall_s": statistics.median(r["step_wall_s"] for r in mine),
            "run_wall_s": sum(r["wall_s"] for r in mine), "run_cpu_s": sum(r["cpu_s"] for r in mine),
        }
    return out


def table(summary: dict[str, dict], steps: int, videos: int) -> str:
    head = ["model", "params M", "train GFLOP/clip (counted)", "infer GFLOP/view (counted)",
            "train ms/clip (engine)", "infer ms/view (engine)", "run s/step (wall)", "top-1 % mean ± std",
            "top-1 % per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, s in summary.items():
        lines.append("| " + " | ".join([
            name, f"{s['params'] / 1e6:.2f}", f"{s['train_gflop_clip']:.3f}", f"{s['infer_gflop_view']:.3f}",
            f"{s['train_ms_clip']:.1f}", f"{s['infer_ms_view']:.2f}", f"{s['run_step_wall_s']:.2f}",
            f"{s['top1_mean']:.1f} ± {s['top1_std']:.1f}",
            " / ".join(f"{v:.1f}" for v in s["top1"]) + f" (seeds {', '.join(map(str, s['seeds']))})",
        ]) + " |")
    lines += ["", f"{steps} steps of batch {BATCH} per run, {videos} validation videos, chance {100 / NUM_CLASSES:g}%."]
    for a_name, b_name in PAIRS:
        if a_name not in summary or b_name not in summary:
            continue
        a, b = summary[a_name], summary[b_name]
        lines.append(
            f"{a_name} / {b_name}: training cost per clip {a['train_gflop_clip'] / b['train_gflop_clip']:.0%} "
            f"counted, {a['train_ms_clip'] / b['train_ms_clip']:.0%} measured (engine); inference per view "
            f"{a['infer_gflop_view'] / b['infer_gflop_view']:.0%} counted, "
            f"{a['infer_ms_view'] / b['infer_ms_view']:.0%} measured; top-1 "
            f"{a['top1_mean'] - b['top1_mean']:+.1f} points."
        )
    return "\n".join(lines)


def chart(summary: dict[str, dict], steps: int, path: Path) -> None:
    """Top-1 (mean over seeds, error bar one std, each seed a small dot) against measured
    training and inference cost (log axes, every tick a plain number from
    `marscale.cost.chart.log_ticks`), counted GFLOPs in the labels, chance dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    from marscale.cost.chart import log_ticks, tick_label

    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in (
        (axes[0], "train", "training ms per clip (engine, process CPU time, 1 thread; log scale)"),
        (axes[1], "infer", "inference ms per view (engine, process CPU time, 1 thread; log scale)"),
    ):
        xs = []
        for name, s in summary.items():
            x = s["train_ms_clip"] if key == "train" else s["infer_ms_view"]
            gflop = s["train_gflop_clip"] if key == "train" else s["infer_gflop_view"]
            colour = COLOURS[name]
            ax.errorbar(x, s["top1_mean"], yerr=s["top1_std"], fmt="o", color=colour, ms=8, capsize=5, zorder=3)
            ax.scatter([x] * len(s["top1"]), s["top1"], color=colour, s=14, alpha=0.5, zorder=2)
            ax.annotate(f"{name}\n{s['top1_mean']:.1f} ± {s['top1_std']:.1f}%\n{x:.3g} ms, {gflop:.3g} GFLOP counted",
                        (x, s["top1_mean"]), textcoords="offset points", xytext=(9, -12), fontsize=9)
            xs.append(x)
        ax.set_xscale("log")
        lo, hi = min(xs) / 1.5, max(xs) * 3.0  # room on the right for the labels
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
        ax.xaxis.set_minor_locator(LogLocator(subs=tuple(range(2, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel, fontsize=10)
        ax.set_ylabel("validation top-1 % (mean ± std over seeds; dots: seeds)", fontsize=10)
        ax.set_ylim(0, 100)
        ax.axhline(100 / NUM_CLASSES, color="grey", lw=0.8, ls="--")
        ax.text(lo * 1.05, 100 / NUM_CLASSES + 1.5, f"chance {100 / NUM_CLASSES:g}%", fontsize=8, color="grey")
        ax.grid(True, which="both", alpha=0.3)
    seeds = len(next(iter(summary.values()))["top1"])
    fig.suptitle(f"Same recipe, {steps} steps each, {seeds} seeds; synthetic 'motion' task, {NUM_CLASSES} classes",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare_mini")
    p.add_argument("--steps", type=int, default=300, help=f"training steps of each run (batch {BATCH})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--videos-per-class", type=int, default=200)
    p.add_argument("--val-videos-per-class", type=int, default=50)
    p.add_argument("--engine-steps", type=int, default=3, help="timed steps per mode in the engine measurement")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME",
                   help=f"the rows to run (default: all): {', '.join(map(repr, MODELS))}")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time() + children_cpu_s()
    shards, synth_times = prepare(args.out, args.videos_per_class, args.val_videos_per_class)
    runs = [train(args.out, name, overrides, seed, shards, args.steps)
            for seed in args.seeds for name, overrides in MODELS.items() if name in args.models]
    engine, engine_times = measure(args.out, args.engine_steps, args.models)
    summary = summarise(runs, engine)
    totals = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() + children_cpu_s() - cpu,
              "synth": synth_times, "engine": engine_times,
              "training": {"wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs)}}
    text = table(summary, args.steps, runs[0]["videos"])
    text += (f"\n\nTime: {totals['wall_s'] / 60:.1f} min wall, {totals['cpu_s'] / 60:.1f} CPU-min in all "
             f"(data {synth_times['wall_s'] / 60:.1f} / {synth_times['cpu_s'] / 60:.1f}, training "
             f"{totals['training']['wall_s'] / 60:.1f} / {totals['training']['cpu_s'] / 60:.1f}, engine "
             f"{engine_times['wall_s'] / 60:.1f} / {engine_times['cpu_s'] / 60:.1f} min wall / CPU).")
    (args.out / "compare_mini.md").write_text(text + "\n")
    (args.out / "compare_mini.json").write_text(
        json.dumps({"steps": args.steps, "summary": summary, "runs": runs, "engine": engine, "time": totals},
                   indent=1) + "\n")
    chart(summary, args.steps, args.out / "compare_mini.png")
    print(text)
    print(f"\nwrote {args.out}/compare_mini.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
