"""Does training with per-clip mask ratios make the ratio a dial at evaluation?

Trains the MAR ViT-Ti of `make compare-mini` (configs/demo.yaml's model, the same task,
recipe and steps: benchmarks/compare_mini.py) twice per seed: once at a fixed 50% mask
ratio (the presets' recipe), once with each clip drawing 25%, 50% or 75%. Then scores
every run at evaluation ratios 0, 0.25, 0.5 and 0.75 (`marscale eval --mask-ratios`) and
writes one table (top-1 mean ± std over seeds, and each seed) and one chart (top-1
against GFLOPs per view, both trainings, error bars, 0-100% with chance drawn).

The task is `marscale-shards synth --task motion` (8 drift directions among a distractor,
no single frame says the class): on the demo's set every evaluation ratio scored 96-100%
for both trainings, which could not tell them apart.

    python benchmarks/ratio_dial.py [--out runs/ratio_dial] [--steps 300] [--seeds 0 1 2]
    python benchmarks/ratio_dial.py --data-from runs/compare_mini   # reuse its shards
    make ratio-dial

Runs the commands a user would (printed), one training at a time, so what it measures is
the product.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from compare_mini import NUM_CLASSES, RECIPE, children_cpu_s, prepare, run

RUNS = {
    "fixed 50%": ["masking.ratio=0.5"],
    "per clip 25/50/75%": ["masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5"],
}
EVAL_RATIOS = "0,0.25,0.5,0.75"
# compare_mini's recipe, keeping the final weights for `marscale eval`.
DIAL_RECIPE = [s for s in RECIPE if not s.startswith("checkpoint.save_at_end=")] + ["checkpoint.save_at_end=true"]


def train_and_score(out: Path, label: str, overrides: list[str], seed: int, shards: dict, steps: int) -> dict:
    run_dir = out / f"{label.split()[0]}_seed{seed}"
    table = run_dir / "eval_ratios"
    times = {"wall_s": 0.0, "cpu_s": 0.0}
    if not (table / "eval_ratios.json").is_file():
        sets = [*DIAL_RECIPE, *overrides, f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
                f"run.output_dir={run_dir}", f"run.max_steps={steps}", f"run.name={run_dir.name}", f"run.seed={seed}"]
        trained = run([sys.executable, "-m", "marscale.cli", "train", "--config", "demo",
                       *[a for s in sets for a in ("--set", s)]], out / f"{run_dir.name}.log")
        scored = run([sys.executable, "-m", "marscale.cli", "eval", "--checkpoint", str(run_dir),
                      "--mask-ratios", EVAL_RATIOS, "--out-dir", str(table)], out / f"{run_dir.name}_eval.log")
        times = {k: trained[k] + scored[k] for k in times}
    rows = json.loads((table / "eval_ratios.json").read_text())["ratios"]
    return {"label": label, "seed": seed, "overrides": overrides, "rows": rows, **times}


def summarise(runs: list[dict]) -> dict[str, list[dict]]:
    """Per training and evaluation ratio: top-1 over seeds (mean, sample std, each seed)."""
    out = {}
    for label in RUNS:
        mine = [r for r in runs if r["label"] == label]
        cells = []
        for i, row in enumerate(mine[0]["rows"]):
            top1 = [r["rows"][i]["top1"] for r in mine]
            cells.append({"mask_ratio": row["mask_ratio"], "gflops_view": row["gflops_view"], "top1": top1,
                          "seeds": [r["seed"] for r in mine], "top1_mean": statistics.mean(top1),
                          "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0})
        out[label] = cells
    return out


def report(summary: dict[str, list[dict]], steps: int, out: Path) -> str:
    first = next(iter(summary.values()))
    lines = [
        f"MAR ViT-Ti (configs/demo.yaml's model), synthetic 'motion' task ({NUM_CLASSES} classes, chance "
        f"{100 / NUM_CLASSES:g}%), compare-mini's recipe, {steps} steps of batch 16: top-1 % at each evaluation "
        "mask ratio, mean ± std over seeds (each seed below)",
        "",
        "| trained with | " + " | ".join(f"eval {c['mask_ratio']:g}" for c in first) + " |",
        "|---|" + "---|" * len(first),
    ]
    for label, cells in summary.items():
        lines.append(f"| {label} | " + " | ".join(f"{c['top1_mean']:.1f} ± {c['top1_std']:.1f}" for c in cells) + " |")
    for label, cells in summary.items():
        lines.append(f"| {label}, per seed | " + " | ".join(" / ".join(f"{v:.1f}" for v in c["top1"]) for c in cells)
                     + " |")
    lines.append("| GFLOPs per view | " + " | ".join(f"{c['gflops_view']:.3f}" for c in first) + " |")
    text = "\n".join(lines)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # The trainings share each row's GFLOPs: drawn 1.5% apart so their error bars stay apart.
    for (label, cells), fmt, colour, dodge in zip(summary.items(), ("o-", "s--"), ("tab:red", "tab:blue"),
                                                  (0.985, 1.015)):
        cells = sorted(cells, key=lambda c: c["gflops_view"])
        x = [c["gflops_view"] * dodge for c in cells]
        ax.errorbar(x, [c["top1_mean"] for c in cells], yerr=[c["top1_std"] for c in cells], fmt=fmt, color=colour,
                    capsize=4, label=f"trained {label}")
        for xi, c in zip(x, cells):
            ax.scatter([xi] * len(c["top1"]), c["top1"], color=colour, s=10, alpha=0.45)
    for c in first:
        ax.annotate(f"eval {c['mask_ratio']:g}", (c["gflops_view"], 3), ha="center", fontsize=8, color="dimgrey")
    chance = 100 / NUM_CLASSES
    ax.axhline(chance, color="grey", lw=1, ls=":", label=f"chance ({chance:g}%)")
    ax.set_ylim(0, 102)
    ax.set_xlabel("GFLOPs per view (1e9 multiply-accumulates, inference)")
    seeds = len(first[0]["top1"])
    ax.set_ylabel("validation top-1 % (mean ± std over seeds; dots: seeds)" if seeds > 1 else "validation top-1 %")
    ax.set_title("The mask ratio as an evaluation-time dial (the two trainings drawn 1.5% apart)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(out / "ratio_dial.png")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ratio_dial"))
    parser.add_argument("--data-from", type=Path, default=None,
                        help="a compare_mini --out folder whose data/ to reuse (default: render into --out)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--videos-per-class", type=int, default=200)
    parser.add_argument("--val-videos-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time() + children_cpu_s()
    shards, _ = prepare((args.data_from or out).resolve(), args.videos_per_class, args.val_videos_per_class)
    runs = [train_and_score(out, label, overrides, seed, shards, args.steps)
            for seed in args.seeds for label, overrides in RUNS.items()]
    summary = summarise(runs)
    text = report(summary, args.steps, out)
    text += (f"\n\nTime: {(time.perf_counter() - wall) / 60:.1f} min wall, "
             f"{(time.process_time() + children_cpu_s() - cpu) / 60:.1f} CPU-min in all.")
    print(text)
    (out / "ratio_dial.md").write_text(text + "\n")
    (out / "ratio_dial.json").write_text(json.dumps({"steps": args.steps, "summary": summary, "runs": runs},
                                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
