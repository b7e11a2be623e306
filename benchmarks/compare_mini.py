"""The MAR experiment in miniature, on a CPU: a small MAR model against a larger full-token
model, trained with the same recipe and steps, accuracy set beside measured cost.

    python benchmarks/compare_mini.py [--out runs/compare_mini] [--steps 100]   # make compare-mini

The paper's claim is that a MAR ViT-L beats a standard ViT-H at a fraction of its cost.
This is the same experiment at a size a 2-core CPU trains in minutes:

    small MAR    ViT-Ti (6 x 192), cell running masking 50%, decoder + bridging classifier
    large full   ViT-S (12 x 384), every token, mean pool + head (the VideoMAE baseline)

both trained from scratch on the synthetic dataset (`marscale-shards synth`) with
configs/demo.yaml's recipe (AdamW, lr 1e-3, fp32, ZeRO-2, seed 0) at batch 16 (8 videos x 2
clips) for the same number of steps, then evaluated on held-out clips. The setting is
chosen so that the full-token model does not saturate (the demo's 4 classes reach 100%):
all 8 synthetic classes (motion directions, grow/shrink, rotations: the pairs differ only
in the order of their frames), 8 frames of 64 x 64 (64 tokens; 32x32 leaves a 2x2 token
grid, too coarse for 2x2 masking cells), fewer videos (60 per class) and a short run
(100 steps, under two epochs), so that neither model has time to learn the set fully.

Steps, each through the project's own commands (so this also checks them end to end):
    1. python -m shards_tools.cli synth   8 classes x 60 training + 20 validation videos
    2. python -m marscale.cli train       the two models (training ends with evaluation)
    3. python -m marscale.cli compare     the same two configs on the engine with synthetic
                                          tensors: training and inference time per clip
                                          (process CPU time, one thread) beside counted FLOPs
    4. the table (Markdown) and chart (PNG) in --out: top-1 against measured and counted cost
The training runs' own wall time per step (from metrics.jsonl) is reported too; on a
shared machine it says more about the neighbours than about the models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NUM_CLASSES = 8
SIZE = 64
SOURCE_FRAMES = 16
BATCH = 16
CLIP = ["clip.num_frames=8", f"clip.img_size={SIZE}", f"data.short_side={SIZE}"]
# The recipe both models share (configs/demo.yaml plus these).
RECIPE = [*CLIP, f"model.num_classes={NUM_CLASSES}", "checkpoint.every_steps=0", "checkpoint.save_at_end=false",
          "logging.every_steps=10", "logging.tensorboard=false", "run.eval_every_steps=0", "optim.warmup_epochs=0.5",
          f"data.batch_size={BATCH}"]
MODELS = {
    "MAR ViT-Ti 50%": ["model.variant=vit_tiny"],
    "ViT-S full": ["model.variant=vit_s", "model.arch=vit", "masking.kind=none", "model.decoder.enabled=false"],
}


def run(command: list[str], log: Path) -> float:
    """Run `command` in the repository with its output in `log`; returns the wall seconds."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}), see {log}")
    return time.perf_counter() - start


def prepare(out: Path, per_class: int, val_per_class: int) -> dict[str, Path]:
    data = out / "data"
    shards = {s: data / "shards" / s for s in ("train", "val")}
    if not all((p / "manifest.json").is_file() for p in shards.values()):
        run([sys.executable, "-m", "shards_tools.cli", "synth", "--out", str(data), "--num-classes", str(NUM_CLASSES),
             "--videos-per-class", str(per_class), "--val-videos-per-class", str(val_per_class),
             "--size", f"{SIZE}x{SIZE}", "--frames", str(SOURCE_FRAMES), "--seed", "0", "--workers", "2",
             "--shards", "--samples-per-shard", "8"], out / "synth.log")
    return shards


def train(out: Path, name: str, overrides: list[str], shards: dict[str, Path], steps: int) -> dict:
    run_dir = out / name.replace(" ", "_").replace("%", "")
    sets = [*RECIPE, *overrides, f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
            f"run.output_dir={run_dir}", f"run.max_steps={steps}", f"run.name={run_dir.name}"]
    seconds = run([sys.executable, "-m", "marscale.cli", "train", "--config", "demo",
                   *[a for s in sets for a in ("--set", s)]], out / f"{run_dir.name}.log")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "name": name, "overrides": overrides, "run_dir": str(run_dir), "wall_s": seconds,
        "top1": evaluation["top1"], "top5": evaluation["top5"], "videos": evaluation["num_videos"],
        "step_wall_s": statistics.median(m["step_time_s"] for m in metrics if "step_time_s" in m),
        "train_losses": [(m["step"], m["loss"]) for m in metrics],
        "clips_per_step": plan["clips_per_step"], "flops_per_train_clip": plan["flops_per_clip_train"],
        "macs_per_view": plan["macs_per_view_eval"],
    }


def measure(out: Path, steps: int) -> dict[str, dict]:
    """`marscale compare` on the two configs (the engine, synthetic tensors, the training batch)."""
    entries = [":".join(["demo", *RECIPE, *overrides]) for overrides in MODELS.values()]
    folder = out / "engine"
    run([sys.executable, "-m", "marscale.cli", "compare", *entries, "--reference", entries[1], "--batch", str(BATCH),
         "--steps", str(steps), "--warmup", "1", "--budget-min", "60", "--train-videos", "800",
         "--out", str(folder)], out / "compare.log")
    rows = json.loads((folder / "compare.json").read_text())["rows"]
    return {name: row for name, row in zip(MODELS, rows)}


def table(results: list[dict], engine: dict[str, dict]) -> str:
    head = ["model", "params M", "train GFLOP/clip (counted)", "infer GFLOP/view (counted)",
            "train ms/clip (engine)", "infer ms/view (engine)", "train run s/step (wall)", "top-1 %", "top-5 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        e = engine[r["name"]]
        lines.append("| " + " | ".join([
            r["name"], f"{e['params_training'] / 1e6:.2f}", f"{r['flops_per_train_clip'] / 1e9:.3f}",
            f"{2 * r['macs_per_view'] / 1e9:.3f}", f"{e['train_step_median_s'] / e['batch'] * 1e3:.1f}",
            f"{1e3 / e['infer_clips_per_s']:.1f}", f"{r['step_wall_s']:.2f}", f"{r['top1']:.1f}", f"{r['top5']:.1f}",
        ]) + " |")
    small, large = results
    es = engine[small["name"]]
    lines += [
        "",
        f"{small['name']} / {large['name']}: training FLOPs per clip "
        f"{small['flops_per_train_clip'] / large['flops_per_train_clip']:.1%} counted, "
        f"{es['ratio_measured_train']:.1%} measured (engine); inference per view "
        f"{small['macs_per_view'] / large['macs_per_view']:.1%} counted, {es['ratio_measured_view']:.1%} measured; "
        f"top-1 {small['top1']:.1f}% vs {large['top1']:.1f}% after {small['train_losses'][-1][0]} steps each.",
    ]
    return "\n".join(lines)


def chart(results: list[dict], engine: dict[str, dict], path: Path) -> None:
    """Top-1 against measured training and inference cost (log axes, every tick a plain
    number from `marscale.cost.chart.log_ticks`), chance dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    from marscale.cost.chart import log_ticks, tick_label

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in (
        (axes[0], "train", "training ms per clip (engine, process CPU time; log scale)"),
        (axes[1], "infer", "inference ms per view (engine, process CPU time; log scale)"),
    ):
        xs = []
        for r, colour in zip(results, ("tab:red", "tab:blue")):
            e = engine[r["name"]]
            x = e["train_step_median_s"] / e["batch"] * 1e3 if key == "train" else 1e3 / e["infer_clips_per_s"]
            gflop = r["flops_per_train_clip"] / 1e9 if key == "train" else 2 * r["macs_per_view"] / 1e9
            ax.scatter(x, r["top1"], color=colour, s=60, zorder=3)
            ax.annotate(f"{r['name']}\n{x:.3g} ms, {gflop:.2f} GFLOP counted", (x, r["top1"]),
                        textcoords="offset points", xytext=(7, -4), fontsize=8)
            xs.append(x)
        ax.set_xscale("log")
        lo, hi = min(xs) / 1.6, max(xs) * 4.0  # room on the right for the labels
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
        ax.xaxis.set_minor_locator(LogLocator(subs=tuple(range(2, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation top-1 %")
        ax.set_ylim(0, 105)
        ax.axhline(100 / NUM_CLASSES, color="grey", lw=0.8, ls="--")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Same recipe and steps, {NUM_CLASSES} synthetic classes (dashed: chance, "
                 f"{100 / NUM_CLASSES:g}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare_mini")
    p.add_argument("--steps", type=int, default=100, help=f"training steps of each model (batch {BATCH})")
    p.add_argument("--videos-per-class", type=int, default=60)
    p.add_argument("--val-videos-per-class", type=int, default=20)
    p.add_argument("--engine-steps", type=int, default=2, help="timed steps per mode in the engine measurement")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shards = prepare(args.out, args.videos_per_class, args.val_videos_per_class)
    results = [train(args.out, name, overrides, shards, args.steps) for name, overrides in MODELS.items()]
    engine = measure(args.out, args.engine_steps)
    text = table(results, engine)
    (args.out / "compare_mini.md").write_text(text + "\n")
    (args.out / "compare_mini.json").write_text(json.dumps({"runs": results, "engine": engine}, indent=1) + "\n")
    chart(results, engine, args.out / "compare_mini.png")
    print(text)
    print(f"\n{time.perf_counter() - start:.0f} s in all; wrote {args.out}/compare_mini.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
