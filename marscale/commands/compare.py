"""`marscale compare`: MAR against full-token ViTs, counted and measured side by side.

    marscale compare                                   # the seven presets, measured on this device
    marscale compare --quick                           # tiny shapes, seconds: the CI smoke run
    marscale compare vit_b_k400 mar_vit_b_k400:masking.ratio=0.75 --reference vit_b_k400
    marscale compare --set deepspeed.zero_stage=3 --out runs/compare   # + .md .csv .json .png
    marscale compare --checkpointing config            # each preset's own activation recomputation

For every config: parameters, counted GFLOPs per view, per test video and per training
clip, the published schedule's FLOPs; then, measured on this device with the real engine
(`marscale.engine.measure`): step time (median and spread), training and inference
clips/s, peak memory, achieved TFLOP/s and MFU, and device-hours for the schedule. Every
row is also a ratio to the reference (full-token ViT-H), counted beside measured, and the
ratios that bear on the paper's "53%" and "14.5%" are listed with what enters them.

Every row recomputes activations by one policy (`--checkpointing`, default `none`): the
presets' own settings differ (ViT-H recomputes all 32 blocks, MAR ViT-L none), and a
measured ratio between them would include ViT-H's recomputation. The policy and the
blocks it recomputes are printed in every row.

On a CPU the configs are measured cheapest first, at batch 1, while the estimated time
fits `--budget-min`; the rest are marked "not measured" with the reason. Nothing is
estimated in place of a measurement.

A row whose measurement raises (out of memory, or any other error) gets the reason in its
row and the next row is measured; the `--out` files are written before anything is
printed, with every row, also when Ctrl-C stops the measuring. A row that failed with an
error other than out of memory makes the exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import sys

from marscale.core import exits
from marscale.cost.compare import (
    DEFAULT_ENTRIES,
    CHECKPOINTING,
    DEFAULT_REFERENCE,
    K400_TRAIN_VIDEOS,
    PAPER_SAVING,
    PAPER_VIT_L_VS_H,
    RATIO_TERMS,
    CompareRow,
    Entry,
    PaperTerm,
    apply_checkpointing,
    checkpointing_caption,
    counted_row,
    estimate_memory_bytes,
    estimate_seconds,
    fill_ratios,
    find_reference,
    paper_terms,
)

logger = logging.getLogger(__name__)

QUICK_ENTRIES = ("demo:model.arch=vit:masking.kind=none:model.decoder.enabled=false", "demo",
                 "demo:masking.ratio=0.75")
"""--quick: the demo's tiny model, full tokens (the reference) and MAR 50% / 75%."""
QUICK_OVERRIDES = ("clip.img_size=32", "clip.num_frames=4", "data.short_side=32", "logging.tensorboard=false")
"""--quick: 4 frames of 32 x 32 (8 tokens)."""
OUT_NAME = "compare"


def _count(least: int):
    """argparse type: an int >= `least`. `--batch 0` must be an error, not the default it
    would become under `args.batch or ...`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value" errors
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "entries", nargs="*", metavar="CONFIG[:key=value...]",
        help=f"configs to compare: preset or YAML, with overrides for that one (default: {' '.join(DEFAULT_ENTRIES)})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a value in every config, e.g. --set deepspeed.zero_stage=3 (repeatable)",
    )
    parser.add_argument("--reference", default=None,
                        help=f"entry (or label) every row is divided by (default: {DEFAULT_REFERENCE})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the demo model (full, MAR 50%%, 75%%) at 4x32x32, batch 2, 2 timed steps")
    parser.add_argument("--batch", type=_count(1), default=None,
                        help="clips per measured step (default: the config's on GPU, 1 on CPU)")
    parser.add_argument("--steps", type=_count(1), default=None,
                        help="timed steps per mode (default: GPU 10, CPU 3)")
    parser.add_argument("--warmup", type=_count(0), default=None, help="untimed steps first (default: GPU 3, CPU 1)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="measure configs (cheapest first) while the estimated time fits this many "
                        "minutes (default: 10 on CPU, no limit on GPU)")
    parser.add_argument("--threads", type=_count(1), default=None,
                        help="CPU threads while measuring (default 1 on CPU: steps are timed in CPU time)")
    parser.add_argument("--no-measure", action="store_true", help="counted columns only")
    parser.add_argument(
        "--checkpointing", choices=tuple(CHECKPOINTING), default="none",
        help="activation recomputation of every row: none (default; the ratios compare the same work), all "
        "(every encoder block, when activations do not fit), config (each config's own model.grad_checkpointing: "
        "the presets differ, and a measured ratio then includes the recomputation)",
    )
    parser.add_argument("--train-videos", type=int, default=K400_TRAIN_VIDEOS,
                        help="training videos of the schedule (Kinetics-400: about 240k)")
    parser.add_argument("--top1", action="append", default=[], metavar="LABEL=VALUE",
                        help="a top-1 to plot for a row, e.g. 'MAR ViT-L 50%%=85.3' (repeatable)")
    parser.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    parser.add_argument("--out", default=None, help=f"folder for {OUT_NAME}.md/.csv/.json/.png")


# ------------------------------------------------------------------------ measuring


def _settings(args: argparse.Namespace, device_type: str) -> tuple[int | None, int, int, float | None]:
    gpu = device_type == "cuda"
    batch = args.batch or (2 if args.quick else (None if gpu else 1))
    steps = args.steps or (2 if args.quick else (10 if gpu else 3))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or not gpu else 3)
    budget = args.budget_min if args.budget_min is not None else (None if gpu else 10.0)
    return batch, steps, warmup, budget


def _available_memory(device_type: str, baseline_rss: int) -> int | None:
    """Memory a config may use: free GPU memory, or on a CPU the system's available memory
    plus what this process grew by since `baseline_rss` (freed engines stay in its heap,
    where the next one reuses them)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available + max(0, psutil.Process().memory_info().rss - baseline_rss)


def _recompute_hint(row: CompareRow) -> str:
    """What to try when a row's activations do not fit."""
    return "; --checkpointing all recomputes every block" if row.grad_checkpointing < row.encoder_depth else ""


def _one_line(err: Exception) -> str:
    """`Type: the message's first line`."""
    lines = str(err).strip().splitlines()
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def measure_rows(rows: list[CompareRow], configs: dict[str, object], args: argparse.Namespace) -> tuple[str, bool]:
    """Measure the rows (cheapest first) that fit the budget and memory; returns a line
    with the settings, and whether Ctrl-C stopped the measuring. Rows left out get their
    reason in `not_measured`; a row whose measurement raised gets the error in `error`
    too, and the next row is measured (a broken CUDA context then fails each in turn)."""
    import time

    import torch
    from tqdm import tqdm

    from marscale.core import dist
    from marscale.engine.measure import measure

    dist.init_distributed()
    device = dist.resolve_device("auto")
    batch_arg, steps, warmup, budget = _settings(args, device.type)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    order = sorted(rows, key=lambda r: r.macs_train_clip)
    per_row = 2 * (warmup + steps)
    bar = tqdm(total=per_row * len(order), desc="measuring", unit="step", dynamic_ncols=True, file=sys.stderr)
    start, rate = time.perf_counter(), None  # achieved TFLOP/s of the last measured config
    import psutil  # a DeepSpeed dependency

    baseline_rss = psutil.Process().memory_info().rss
    interrupted = False
    try:
        for done, row in enumerate(order, start=1):
            cfg = configs[row.entry]
            batch = batch_arg or cfg.data.batch_size
            bar.set_description(f"measuring {row.label} (batch {batch})")
            need = estimate_memory_bytes(row, cfg, batch)
            free = _available_memory(device.type, baseline_rss)
            left = None if budget is None else budget * 60 - (time.perf_counter() - start)
            guess = estimate_seconds(row, batch, warmup + steps, rate, device.type) if rate else None
            where = "CPU" if device.type == "cpu" else "GPU"
            if free is not None and need > free:
                row.not_measured = (f"{where}: needs about {need / 2**30:.0f} GiB at batch {batch}, "
                                    f"{free / 2**30:.0f} GiB free{_recompute_hint(row)}")
            elif left is not None and guess is not None and guess > left:
                row.not_measured = (f"{where}: about {guess / 60:.0f} min at batch {batch} at real shapes, over the "
                                    f"{budget:g} min budget" + ("; run on a GPU" if device.type == "cpu" else ""))
            else:
                try:
                    row.measured = measure(cfg, batch=batch, warmup=warmup, steps=steps, videos=row.schedule_videos,
                                           tick=lambda: bar.update(1))
                    rate = row.measured.achieved_tflops
                except torch.OutOfMemoryError:
                    row.not_measured = f"{where}: out of memory at batch {batch}{_recompute_hint(row)}"
                except Exception as err:  # recorded in the row; the other rows go on
                    logger.exception("measuring %s failed", row.label)
                    row.error = _one_line(err)
                    row.not_measured = f"{where}: failed at batch {batch}: {row.error}"
            if row.measured is None:
                logger.info("%s not measured: %s", row.label, row.not_measured)
            bar.n = per_row * done  # skipped rows count as done
            bar.refresh()
    except KeyboardInterrupt:  # the rows measured so far are still written
        interrupted = True
        for r in order:
            if r.measured is None and not r.not_measured:
                r.not_measured = "interrupted (Ctrl-C)"
    finally:
        bar.close()
    shown = f"batch {batch_arg}" if batch_arg else "each config's batch"
    clock = (f"process CPU time with {torch.get_num_threads()} thread(s) (wall time in the JSON)"
             if device.type == "cpu" else "wall time after a device sync")
    peaks = sorted({r.measured.peak.describe() for r in rows if r.measured is not None})  # one per precision
    return (f"measured on {device.type.upper()}: {shown}, {warmup} warm-up + {steps} timed steps per mode, "
            f"steps timed in {clock}" + (f", budget {budget:g} min" if budget is not None else "")
            + "".join(f"; {p}" for p in peaks) + ("; interrupted (Ctrl-C)" if interrupted else "")), interrupted


# ------------------------------------------------------------------------ formatting


def _gf(macs: int) -> str:
    return f"{macs / 1e9:.1f}" if macs >= 1e8 else f"{macs / 1e9:.4f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def counted_table(rows: list[CompareRow]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "clip", "tokens", "params M (inf/train)", "GFLOPs/view", "views", "GFLOPs/video",
            "train GFLOPs/clip", "schedule (epochs x clips)", "schedule EFLOPs", "top-1 (published)"]
    body = [
        [r.label, r.clip, f"{r.visible_tokens}/{r.tokens}",
         f"{r.params_inference / 1e6:.1f}/{r.params_training / 1e6:.1f}", _gf(r.macs_view), str(r.views),
         _gf(r.macs_video), _gf(r.macs_train_clip), f"{r.epochs} x {r.clips_per_video}",
         f"{2 * r.schedule_macs / 1e18:.3g}", "-" if r.published_top1 is None else f"{r.published_top1:.1f}"]
        for r in rows
    ]
    return head, body


def measured_table(rows: list[CompareRow]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "ZeRO/precision", "recompute (policy)", "batch", "train step ms (median, spread)",
            "train clips/s", "infer clips/s", "peak mem GiB", "TFLOP/s", "MFU", "schedule device-h"]
    body = []
    for r in rows:
        setting = f"{r.zero_stage}/{r.precision}"
        m = r.measured
        if m is None:
            body.append([r.label, setting, r.recompute, "-", f"not measured ({r.not_measured})"]
                        + ["-"] * (len(head) - 5))
            continue
        body.append([
            r.label, setting, r.recompute, str(m.batch), f"{m.train_median_s * 1e3:.1f} ({m.train_spread_s * 1e3:.1f})",
            f"{m.train_clips_per_s:.3g}", f"{m.infer_clips_per_s:.3g}", f"{m.peak_memory_bytes / 2**30:.2f}",
            f"{m.achieved_tflops:.3g}", _pct(m.mfu), f"{r.device_hours:.3g}",
        ])
    return head, body


def phase_table(rows: list[CompareRow]) -> tuple[list[str], list[list[str]]]:
    """The measured training step by phase (medians per step) beside its counted parts."""
    head = ["model", "batch", "step ms", "masks+data ms", "forward ms", "backward ms", "optimizer ms",
            "phases / step", "counted fwd GFLOPs/clip", "counted bwd GFLOPs/clip", "optimizer params M"]
    body = []
    for r in rows:
        counted = [_gf(r.macs_train_forward), _gf(r.macs_train_backward), f"{r.params_training / 1e6:.1f}"]
        m = r.measured
        if m is None:
            body.append([r.label, "-", "not measured", "-", "-", "-", "-", "-", *counted])
            continue
        p = m.phase_median_s
        body.append([r.label, str(m.batch), f"{m.train_median_s * 1e3:.1f}", f"{(p['masks'] + p['data']) * 1e3:.1f}",
                     *(f"{p[k] * 1e3:.1f}" for k in ("forward", "backward", "optimizer")),
                     f"{sum(p.values()) / m.train_median_s:.1%}", *counted])
    return head, body


def phase_ratio_table(rows: list[CompareRow], reference: CompareRow) -> tuple[list[str], list[list[str]]]:
    """Each phase's measured ratio to the reference beside its counted one."""
    keys = ("measured_forward", "train_forward", "measured_backward", "train_backward", "measured_optimizer",
            "optimizer_params", "measured_input", "measured_train", "train")
    head = [f"model / {reference.label}", "forward measured", "forward counted", "backward measured",
            "backward counted", "optimizer measured", "optimizer params", "masks+data measured", "step measured",
            "train counted"]
    return head, [[r.label] + [_pct(r.ratios.get(k)) for k in keys] for r in rows]


def ratio_table(rows: list[CompareRow], reference: CompareRow) -> tuple[list[str], list[list[str]]]:
    head = [f"model / {reference.label}", "recompute (row vs reference)", "view counted", "view measured",
            "train counted", "train measured", "schedule counted", "schedule measured", "memory measured"]
    body = [
        [r.label, f"{r.grad_checkpointing}/{r.encoder_depth} vs "
                  f"{reference.grad_checkpointing}/{reference.encoder_depth} ({r.checkpointing})"] + [_pct(r.ratios.get(k)) for k in ("view", "measured_view", "train", "measured_train", "schedule",
                                                       "measured_schedule", "measured_memory")]
        for r in rows
    ]
    return head, body


def _text(head: list[str], body: list[list[str]]) -> str:
    lines = [head] + body
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(line) for line in body])


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])


def notes(rows: list[CompareRow], reference: CompareRow, settings: str) -> list[str]:
    """What the columns and ratios hold, and the ratios beside the paper's figures."""
    out = [
        "GFLOPs as in the MAR/VideoMAE papers = 1e9 multiply-accumulates (counted, marscale.cost.counting); "
        "schedule EFLOPs, TFLOP/s and MFU use hardware FLOPs (2x).",
        f"schedule = {reference.schedule_videos:,} training videos x epochs x clips per video (the preset's); "
        "device-hours = measured seconds per training clip x those clips, on one device.",
        "Measured: the real engine (DeepSpeed, the config's ZeRO stage and precision, activation recomputation "
        "by --checkpointing), "
        "synthetic uint8 clips of the config's shape; train step = masks, copy, forward, loss, backward, "
        "optimizer step; infer = forward with the evaluation mask. Peak memory: CUDA allocator peak on GPU, "
        "process peak RSS on CPU.",
        "By phase: the engine's own step timed at each phase's end (marscale/engine/phases.py; on a GPU after a "
        "device sync): masks+data = the step's masks, copy, normalise, mixup and cast; forward = model and loss; "
        "backward (with any recomputation); optimizer = DeepSpeed's step (gradient reduction, clipping, AdamW). "
        "Medians per step, which need not add up to the median step (phases / step). Counted: forward and "
        "backward MACs of one training clip (backward about 2x forward: gradients of inputs and weights); the "
        "optimizer's work grows with the parameters it updates, which no FLOP count includes.",
        settings,
        checkpointing_caption(rows) + ".",
        f"Ratios are row / {reference.label} ({reference.entry}); what enters each:",
    ]
    out += [f"  {k}: {v}" for k, v in RATIO_TERMS.items()]
    terms = paper_terms(rows, reference)
    out += _paper_lines(terms)
    return out


def _paper_lines(terms: list[PaperTerm]) -> list[str]:
    lines = []
    saving = [t for t in terms if t.claim == "saving"]
    if saving:
        lines.append(f'The paper: "MAR cuts ViT compute by {PAPER_SAVING:.0%}". Savings here (1 - MAR / full):')
        lines += [f"  {t.value:6.1%}  {t.name}" for t in saving]
    vs_h = [t for t in terms if t.claim == "vit_l_vs_h"]
    if vs_h:
        lines.append(f'The paper: "MAR ViT-L costs {PAPER_VIT_L_VS_H:.1%} of ViT-H". Ratios here:')
        lines += [f"  {t.value:6.1%}  {t.name}" for t in vs_h]
        close = [t for t in vs_h if abs(t.value - PAPER_VIT_L_VS_H) < 0.0005]
        lines.append(f"{close[0].name} matches it." if close else
                     f"None is {PAPER_VIT_L_VS_H:.1%}; the paper's accounting is not recoverable from these terms.")
    return lines


def render(rows: list[CompareRow], reference: CompareRow, settings: str, fmt: str) -> str:
    tables = [("Counted", counted_table(rows)), ("Measured", measured_table(rows)),
              ("Training step by phase", phase_table(rows)),
              (f"Ratios to {reference.label}", ratio_table(rows, reference)),
              (f"Training step by phase, ratios to {reference.label}", phase_ratio_table(rows, reference))]
    if fmt == "csv":
        return to_csv(rows)
    if fmt == "json":
        return to_json(rows, reference, settings)
    show = _markdown if fmt == "markdown" else _text
    parts = []
    for title, (head, body) in tables:
        parts += [f"### {title}" if fmt == "markdown" else f"{title}:", "", show(head, body), ""]
    parts += notes(rows, reference, settings)
    return "\n".join(parts)


def to_csv(rows: list[CompareRow]) -> str:
    buf = io.StringIO()
    records = [r.flat() for r in rows]
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def to_json(rows: list[CompareRow], reference: CompareRow, settings: str) -> str:
    doc = {
        "unit": "MACs (the papers' FLOPs); hardware FLOPs = 2 x MACs",
        "reference": reference.entry,
        "settings": settings,
        "ratio_terms": RATIO_TERMS,
        "rows": [r.flat() for r in rows],
        "paper_terms": [dataclasses.asdict(t) for t in paper_terms(rows, reference)],
        "paper": {"saving": PAPER_SAVING, "vit_l_vs_h": PAPER_VIT_L_VS_H},
    }
    return json.dumps(doc, indent=1)


# ------------------------------------------------------------------------------ run


def _check_checkpointing(policy: str, common: list[str], entries: list[Entry]) -> None:
    """A model.grad_checkpointing override is kept only under `--checkpointing config`:
    under `none` or `all` the policy would replace it without a word."""
    key = "model.grad_checkpointing"
    named = [o for o in [*common, *(o for e in entries for o in e.overrides)] if o.split("=")[0].strip() == key]
    if named and policy != "config":
        raise ValueError(f"{named[0]} is replaced by --checkpointing {policy} (every row: "
                         f"{CHECKPOINTING[policy]}); pass --checkpointing config to keep each config's own {key}")


def run(args: argparse.Namespace) -> int:
    from marscale.commands.common import prepare_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entries = [Entry.parse(e) for e in (args.entries or (QUICK_ENTRIES if args.quick else DEFAULT_ENTRIES))]
    common = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    top1 = {}
    for item in args.top1:
        name, sep, value = item.rpartition("=")
        if not sep:
            raise ValueError(f"--top1 {item!r} must look like 'LABEL=VALUE'")
        top1[name] = float(value)
    _check_checkpointing(args.checkpointing, common, entries)
    configs = {e.text: apply_checkpointing(e.load(common), args.checkpointing) for e in entries}
    rows = [counted_row(e, configs[e.text], args.train_videos, top1, args.checkpointing) for e in entries]
    reference = find_reference(rows, args.reference or (entries[0].text if args.quick else DEFAULT_REFERENCE))
    settings, interrupted = "not measured (--no-measure)", False
    if not args.no_measure:
        prepare_device(next(iter(configs.values())).run.device)
        from marscale.core import dist

        # DeepSpeed prints to stdout (and its logger keeps the stream it found when it was
        # imported, here): keep stdout for the table, CSV or JSON.
        try:
            with contextlib.redirect_stdout(sys.stderr):
                settings, interrupted = measure_rows(rows, configs, args)
        finally:
            dist.destroy()
        for r in rows:
            if r.measured is None and not r.not_measured:
                r.not_measured = "skipped"
    else:
        for r in rows:
            r.not_measured = "--no-measure"
    fill_ratios(rows, reference)
    if args.out:  # first: the files hold every row measured, whatever happens after
        write_outputs(args.out, rows, reference, settings)
    print(render(rows, reference, settings, args.format))
    if interrupted:
        raise KeyboardInterrupt
    failed = [r for r in rows if r.error]
    for r in failed:
        logger.error("%s: %s", r.label, r.not_measured)
    return exits.FAILED if failed else exits.FINISHED


def write_outputs(out: str, rows: list[CompareRow], reference: CompareRow, settings: str) -> dict[str, str]:
    """compare.md, .csv, .json and .png in `out`; returns their paths by extension."""
    from marscale.cost.chart import draw
    from marscale.core.io import atomic_write_bytes

    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"{OUT_NAME}.{ext}") for ext in ("md", "csv", "json", "png")}
    atomic_write_bytes(paths["md"], (render(rows, reference, settings, "markdown") + "\n").encode())
    atomic_write_bytes(paths["csv"], to_csv(rows).encode())
    atomic_write_bytes(paths["json"], (to_json(rows, reference, settings) + "\n").encode())
    draw(rows, reference, paths["png"])
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
    return paths
