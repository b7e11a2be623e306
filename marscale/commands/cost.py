"""`marscale cost`: the parameter and FLOP table as text, Markdown, CSV or JSON.

The numbers come from `marscale.cost.table`; this module only lays them out and adds the
notes on units and on how the backward pass is counted, and the paragraph that sets the
counted ratios against the paper's "MAR ViT-L costs 14.5% of ViT-H".
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys

from marscale.cost.table import (
    KINETICS_VIEWS,
    TABLE_RATIOS,
    TABLE_VARIANTS,
    ClaimTerm,
    CostRow,
    cost_table,
    vit_h_claim_terms,
)
from marscale.model import VARIANTS

BACKWARD_NOTE = (
    "training = forward + backward per clip; backward counted as autograd runs it on the meta "
    "device: input and weight gradients of every matmul (2x forward), q/k/v gradients of "
    "attention (2x forward), weight gradient only for the tubelet embedding (the clip needs "
    "none); recomputation for gradient checkpointing not counted"
)
UNIT_NOTE = "GFLOPs as in the MAR/VideoMAE papers = 1e9 multiply-accumulates; hardware FLOPs are 2x"


def claim_paragraph(terms: list[ClaimTerm], claimed: float = 0.145) -> str:
    """Every counted term, then the one that matches `claimed` or, if none does, the closest."""
    closest = min(terms, key=lambda t: abs(t.value - claimed))
    lines = [
        f'The MAR paper says "MAR ViT-L costs {claimed:.1%} of ViT-H". Its exact accounting is not',
        "recoverable from per-view GFLOPs; these are the ratios counted here:",
    ]
    lines += [f"  {t.value:7.1%}  {t.name}" for t in terms]
    if abs(closest.value - claimed) < 0.0005:
        lines.append(f"{closest.name} matches the claim ({closest.value:.1%}).")
    else:
        lines.append(f"Closest: {closest.value:.1%} ({closest.name}).")
        lines.append(f"No counted term is {claimed:.1%}, so none is reported as the paper's number.")
    return "\n".join(lines)


# ------------------------------------------------------------------------ formatting

_COLUMNS = (
    "model",
    "setting",
    "tokens",
    "params M (inf/train)",
    "GFLOPs/view",
    "GFLOPs x{views}",
    "train GFLOPs/clip",
    "view/full",
    "view/ViT-H",
    "train/full",
    "train/ViT-H",
)


def _cells(r: CostRow) -> list[str]:
    return [
        r.model,
        r.setting,
        f"{r.visible_tokens}/{r.tokens}",
        f"{r.params_inference / 1e6:.1f}/{r.params_training / 1e6:.1f}",
        f"{r.macs_view / 1e9:.1f}",
        f"{r.macs_multiview / 1e9:.0f}",
        f"{r.macs_training / 1e9:.1f}",
        f"{r.view_vs_full:.1%}",
        f"{r.view_vs_vit_h:.1%}",
        f"{r.training_vs_full:.1%}",
        f"{r.training_vs_vit_h:.1%}",
    ]


def _header(rows: list[CostRow]) -> list[str]:
    views = rows[0].views if rows else KINETICS_VIEWS
    return [c.format(views=views) for c in _COLUMNS]


def format_table(rows: list[CostRow]) -> str:
    body = [_header(rows)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]

    def fmt(line: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(body[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in body[1:]])


def format_markdown(rows: list[CostRow]) -> str:
    head = _header(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def format_csv(rows: list[CostRow]) -> str:
    buf = io.StringIO()
    names = [f.name for f in dataclasses.fields(CostRow)]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(dataclasses.asdict(r))
    return buf.getvalue()


def format_json(rows: list[CostRow], terms: list[ClaimTerm]) -> str:
    doc = {
        "unit": "MACs per clip (the papers' FLOPs); hardware FLOPs = 2 x MACs",
        "backward": BACKWARD_NOTE,
        "rows": [dataclasses.asdict(r) for r in rows],
        "mar_vit_l_vs_vit_h": {t.name: t.value for t in terms},
    }
    return json.dumps(doc, indent=2)


# ------------------------------------------------------------------------------ CLI


def _split(values: list[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser, name: str = "cost") -> None:
    parser.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table")
    parser.add_argument(
        "--variants", nargs="+", default=list(TABLE_VARIANTS), help=f"sizes, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--ratios", nargs="+", default=[str(r) for r in TABLE_RATIOS], help="mask ratios (0 = full tokens)"
    )
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--views", type=int, default=KINETICS_VIEWS, help="test views (K400: 5 clips x 3 crops)")


def run(args: argparse.Namespace) -> int:
    ratios = [float(r) for r in _split(args.ratios)]
    rows = cost_table(_split(args.variants), ratios, args.num_classes, args.views)
    if args.format == "csv":
        sys.stdout.write(format_csv(rows))
        return 0
    terms = vit_h_claim_terms(args.num_classes, args.views)
    if args.format == "json":
        print(format_json(rows, terms))
        return 0
    table = format_markdown(rows) if args.format == "markdown" else format_table(rows)
    print(table)
    print()
    print(f"{UNIT_NOTE}.")
    print(f"Inference: encoder + bridging classifier (MAR) or encoder + head (full); x{args.views}: test views.")
    print(f"Parameters: inference (encoder + classifier) / training (+ decoder); {args.num_classes} classes.")
    print(f"Backward: {BACKWARD_NOTE}.")
    print()
    print(claim_paragraph(terms))
    return 0
