"""Does training with per-clip mask ratios make the ratio a dial at evaluation?

Trains the demo model twice on the demo's synthetic set, same seed and steps: once at a
fixed 50% mask ratio (the presets' recipe), once with each clip drawing 25%, 50% or 75%.
Then scores both at evaluation ratios 0, 0.25, 0.5 and 0.75 (`marscale eval --mask-ratios`)
and writes one table and one plot (top-1 against GFLOPs per view, both models).

    python benchmarks/ratio_dial.py [--out runs/ratio_dial] [--epochs 4]
    make ratio-dial

Runs the commands a user would (printed), so what it measures is the product. About 15
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

RUNS = {
    "fixed 50%": ["masking.ratio=0.5"],
    "per clip 25/50/75%": ["masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5"],
}
EVAL_RATIOS = "0,0.25,0.5,0.75"


def command(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install -e .)")
    return found


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ratio_dial")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from marscale.commands.demo import NUM_CLASSES, SIZES, prepare_data

    out = os.path.abspath(args.out)
    shards = prepare_data(os.path.join(out, "data"), *SIZES["full"])
    results = {}
    for label, overrides in RUNS.items():
        run_dir = os.path.join(out, label.split()[0].replace("%", ""))
        sets = [
            f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", f"run.output_dir={run_dir}",
            f"optim.epochs={args.epochs}", f"run.seed={args.seed}", "logging.tensorboard=false", *overrides,
        ]
        start = time.perf_counter()
        if not os.path.isfile(os.path.join(run_dir, "eval.json")):
            run([command("marscale"), "train", "--config", "demo", *[a for s in sets for a in ("--set", s)]])
        train_s = time.perf_counter() - start
        table = os.path.join(run_dir, "eval_ratios")
        run([command("marscale"), "eval", "--checkpoint", run_dir, "--mask-ratios", EVAL_RATIOS, "--out-dir", table])
        record = json.load(open(os.path.join(table, "eval_ratios.json")))
        results[label] = {"train_seconds": train_s, "rows": record["ratios"], "overrides": overrides}
    report(results, out, args, NUM_CLASSES)


def report(results: dict, out: str, args, num_classes: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = [r["mask_ratio"] for r in next(iter(results.values()))["rows"]]
    lines = [
        f"Demo model (vit_tiny, {num_classes} synthetic classes), {args.epochs} epochs, seed {args.seed}; "
        "top-1 % at each evaluation mask ratio",
        "",
        "| trained with | " + " | ".join(f"eval {r:g}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for label, res in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{row['top1']:.1f}" for row in res["rows"]) + " |")
    gflops = [row["gflops_view"] for row in next(iter(results.values()))["rows"]]
    lines.append("| GFLOPs per view | " + " | ".join(f"{g:.3f}" for g in gflops) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out, "ratio_dial.md").write_text(text)
    Path(out, "ratio_dial.json").write_text(json.dumps(results, indent=1))
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (label, res), marker in zip(results.items(), ("o-", "s-")):
        rows = sorted(res["rows"], key=lambda r: r["gflops_view"])
        x, y = [r["gflops_view"] for r in rows], [r["top1"] for r in rows]
        ax.plot(x, y, marker, label=f"trained {label}")
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(f"{r['mask_ratio']:g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("GFLOPs per view (1e9 multiply-accumulates, inference)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("The mask ratio as an evaluation-time dial (points: eval ratio)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_dial.png"))


if __name__ == "__main__":
    main()
