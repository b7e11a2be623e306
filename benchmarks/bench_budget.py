"""How much a training step's cost varies with per-clip mask ratios: a fixed clip count, a
token budget in visible tokens and one in counted cost (`data.budget_unit`).

With ratios drawn per clip from {0.25, 0.5, 0.75}, a batch of a fixed number of clips
costs more or less with the ratios it drew. A token budget sizes each batch instead
(`marscale.tokens.batches`): "visible" by the encoder's visible tokens, "cost" by the
clips' counted training FLOPs (the decoder runs on every token of every clip, so a clip's
cost is not proportional to its visible tokens). Both budgets are set to what `--clips`
clips at the middle ratio weigh in their unit, at most 3 x `--clips` clips a batch.

Two parts:
- counted: the coefficient of variation (std / mean) of the counted FLOPs of a step, over
  `--steps` seeded steps of one micro-batch on one rank, at the demo's shapes (ViT-Ti,
  16x64x64) and ViT-L 16x224x224 (the `mar_vit_l_k400` preset), for one and two clips per
  video (a group of two clips stays together in a budget). The batches and the FLOPs are
  the run plan's (`marscale.engine.plan.make_plan`: nothing here re-derives them). A step
  of W ranks x A accumulation micro-batches sums W x A independent micro-batches: its CV
  is about these over sqrt(W x A).
- measured (demo shapes, one clip per video): the step time of `--measure-steps` steps
  of each batching, the three interleaved step by step so load on a shared machine falls
  on all three alike. Each step is the trainer's own (`marscale.engine.step.TrainStep` on
  the engine `marscale.engine.build` makes: masks, forward, loss, backward, optimizer
  step), on synthetic uint8 clips. On a CPU the time is process CPU time with one thread
  (as `marscale compare` and benchmarks/bench_packing.py: one thread's CPU time counts
  the work, wall time on a shared machine does not).

    python benchmarks/bench_budget.py                          # both parts, about 2 minutes on CPU
    python benchmarks/bench_budget.py --measure-steps 0        # counted only, seconds
    python benchmarks/bench_budget.py --json runs/bench_budget.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from marscale.core import dist  # noqa: E402
from marscale.engine.build import build_engine  # noqa: E402
from marscale.engine.config import TrainConfig, load_train_config  # noqa: E402
from marscale.engine.measure import device_name, synthetic_plan  # noqa: E402
from marscale.engine.plan import RunPlan  # noqa: E402
from marscale.engine.step import TrainStep  # noqa: E402

SHAPES = {"demo": "demo", "vit_l_16x224": "mar_vit_l_k400"}
"""Shape name -> the preset whose model and clip it takes."""
RATIOS = (0.25, 0.5, 0.75)
BATCHINGS = ("fixed", "visible", "cost")
VIDEOS = 100_000
"""Videos of the stand-in training set (only the plan's epoch arithmetic reads it)."""


def cv(values) -> float:
    """Coefficient of variation: population standard deviation / mean."""
    return statistics.pstdev(values) / statistics.mean(values)


def plans(preset: str, clips: int, clips_per_video: int) -> dict[str, tuple[TrainConfig, RunPlan]]:
    """{batching: (config, run plan)} of `preset` with per-clip ratios `RATIOS`, one rank,
    no accumulation, no mixup: `clips` clips a batch ("fixed"), or a budget of what `clips`
    clips at the middle ratio weigh in visible tokens ("visible") or in cost ("cost")."""
    base = [
        f"masking.ratio=[{','.join(str(r) for r in RATIOS)}]", "masking.eval_ratio=0.5", "data.mixup=0.0",
        "data.cutmix=0.0", f"data.clips_per_video={clips_per_video}", "deepspeed.grad_accum_steps=1",
    ]
    fixed = load_train_config(preset, [*base, f"data.batch_size={clips}"])
    out = {"fixed": (fixed, synthetic_plan(fixed, VIDEOS))}
    visible, flops = out["fixed"][1].batches.visible, out["fixed"][1].flops_by_visible
    middle, top = visible[RATIOS[len(RATIOS) // 2]], max(visible.values())
    budgets = {"visible": clips * middle, "cost": math.ceil(clips * flops[middle] * top / flops[top])}
    for unit, budget in budgets.items():
        cfg = load_train_config(preset, [*base, f"data.batch_size={3 * clips}", f"data.token_budget={budget}",
                                         f"data.budget_unit={unit}"])
        out[unit] = (cfg, synthetic_plan(cfg, VIDEOS))
    return out


def counted(plan: RunPlan, steps: int) -> dict:
    """Counted FLOPs, clips and ratio shares of steps 0..steps-1 of `plan` (rank 0)."""
    flops, clips, ratios = [], [], Counter()
    for step in range(steps):
        batch = plan.batches.step_batches(step, 1)
        n, _, f = batch.work(plan.flops_by_visible)
        flops.append(f)
        clips.append(n)
        ratios.update(batch.by_rank[0][0].ratios)
    total = sum(ratios.values())
    return {
        "token_budget": plan.batches.token_budget,
        "cv": cv(flops),
        "mean_gflop": statistics.mean(flops) / 1e9,
        "max_gflop": max(flops) / 1e9,
        "mean_clips": statistics.mean(clips),
        "ratio_shares": {str(r): ratios[r] / total for r in sorted(ratios)},
    }


def measured(plans_: dict[str, tuple[TrainConfig, RunPlan]], steps: int, warmup: int) -> dict:
    """Time `warmup` + `steps` training steps of each plan's batches on one engine (built
    for the largest batch), the batchings interleaved step by step; {batching: times and
    counted FLOPs of the timed ones}. The configs differ in their batching only."""
    dist.init_distributed()
    cfg = max((c for c, _ in plans_.values()), key=lambda c: c.data.batch_size)
    cap = cfg.data.batch_size
    built = build_engine(cfg, world_size=1, rank=0)
    try:
        runners = {name: TrainStep(c, plan, built, rank=0, world_size=1) for name, (c, plan) in plans_.items()}
        g = torch.Generator().manual_seed(0)
        c = cfg.clip
        video = torch.randint(0, 256, (cap, 3, c.num_frames, c.img_size, c.img_size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, cfg.model.num_classes, (cap,), generator=g)
        out = {name: {"step_s": [], "wall_s": [], "gflop": []} for name in plans_}
        for step in range(warmup + steps):
            for name, (_, plan) in plans_.items():
                b = plan.batches
                micro = {"video": video[: b.batch_size], "label": labels[: b.batch_size]}
                if b.token_budget is not None:  # what the loader carries under a budget
                    ratios = b.ratios(step, 0, 0)
                    micro = {"video": video[: len(ratios)], "label": labels[: len(ratios)],
                             "ratios": torch.tensor(ratios, dtype=torch.float64)}
                w0, c0 = time.perf_counter(), time.process_time()
                ran = runners[name](step, [micro])
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                if step >= warmup:
                    out[name]["step_s"].append(cpu)
                    out[name]["wall_s"].append(wall)
                    out[name]["gflop"].append(ran.batches.work(plan.flops_by_visible)[2] / 1e9)
    finally:
        built.close()
    for row in out.values():
        row["median_s"] = statistics.median(row["step_s"])
        row["cv_time"] = cv(row["step_s"])
        row["cv_counted"] = cv(row["gflop"])
    pooled = [(f, t) for row in out.values() for f, t in zip(row["gflop"], row["step_s"])]
    fs, ts = zip(*pooled)
    fit = statistics.linear_regression(fs, ts)
    return {"batchings": out, "time_vs_flops_r": statistics.correlation(fs, ts),
            "fit_s": {"per_step": fit.intercept, "per_gflop": fit.slope}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="clips of a fixed batch; budgets weigh as many")
    parser.add_argument("--steps", type=int, default=2000, help="seeded steps of the counted part")
    parser.add_argument("--clips-per-video", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--measure-steps", type=int, default=30, help="timed steps per batching (0: skip)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report: dict = {"clips": args.clips, "steps": args.steps, "ratios": list(RATIOS), "counted": {}}

    print(f"counted FLOPs per step, {args.steps} steps of one micro-batch, ratios {list(RATIOS)}, "
          f"{args.clips} clips or their weight")
    print(f"  {'shape':<14}{'clips/video':>12}  {'batching':<9}{'budget':>8}{'clips':>7}{'GFLOP':>10}"
          f"{'max':>10}{'CV':>8}  ratio shares")
    for shape in args.shapes:
        for per_video in args.clips_per_video:
            made = plans(SHAPES[shape], args.clips, per_video)
            rows = {name: counted(plan, args.steps) for name, (_, plan) in made.items()}
            report["counted"][f"{shape}/{per_video}"] = rows
            for name, r in rows.items():
                shares = " ".join(f"{float(k):g}:{v:.1%}" for k, v in r["ratio_shares"].items())
                print(f"  {shape:<14}{per_video:>12}  {name:<9}{r['token_budget'] or '-':>8}{r['mean_clips']:>7.2f}"
                      f"{r['mean_gflop']:>10.1f}{r['max_gflop']:>10.1f}{r['cv']:>8.1%}  {shares}")

    if args.measure_steps > 0:
        per_video = 1
        result = measured(plans(SHAPES["demo"], args.clips, per_video), args.measure_steps, args.warmup)
        report["measured"] = {"device": device_name(torch.device("cpu")), "shape": "demo", "clips_per_video": per_video,
                              "steps": args.measure_steps, "warmup": args.warmup, **result}
        print(f"measured training steps at demo shapes, {args.measure_steps} per batching (interleaved), "
              f"{report['measured']['device']}, process CPU time")
        print(f"  {'batching':<9}{'median s':>10}{'CV time':>9}{'CV counted':>12}")
        for name, r in result["batchings"].items():
            print(f"  {name:<9}{r['median_s']:>10.3f}{r['cv_time']:>9.1%}{r['cv_counted']:>12.1%}")
        fit = result["fit_s"]
        print(f"  over all timed steps: correlation of step time with counted FLOPs {result['time_vs_flops_r']:.3f}, "
              f"least squares {fit['per_step']:.3f} s + {fit['per_gflop'] * 1e3:.1f} ms per GFLOP")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
