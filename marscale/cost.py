"""Parameters and FLOPs of MAR and full-token video ViTs, counted on the real modules.

Every number comes from running the model built on the meta device (shapes only, no
memory, no arithmetic) under `torch.utils.flop_counter.FlopCounterMode`, which counts
matmuls, convolutions and attention. Nothing here is a formula: the analytic formula
lives in the tests as a cross-check.

Two units, named apart everywhere:
- MACs (multiply-accumulates) - what the MAR and VideoMAE papers call "FLOPs" (ViT-B
  180 G per view). `marscale cost` prints these, labelled GFLOPs as the papers do.
- FLOPs (true hardware FLOPs) = 2 x MACs. Achieved TFLOP/s and MFU must use these.

What is counted (per clip, batch 1; costs are linear in the batch):
- inference (one view): encoder + bridging classifier (MAR) or encoder + mean-pool head
  (full tokens). The tubelet embedding runs on all N tokens; MAR gathers the visible ones
  after it. The reconstruction decoder does not run at inference.
- training: forward (encoder, classifier and, for MAR, the reconstruction decoder) plus
  backward as autograd runs it: for every matmul the gradient w.r.t. its input and
  w.r.t. its weight (2x the forward), for attention the gradients of q, k, v (2x the
  forward's two matmuls), and for the tubelet embedding only the weight gradient (the
  clip needs none). Activation recomputation (gradient checkpointing) is not counted:
  these are model FLOPs, the numerator of MFU.
- Norms, GELU, softmax, adds and the loss are not counted (as in the papers).

Python API (for the training loop's TFLOP/s and MFU):
    model_flops_per_clip(model_cfg, clip_cfg, mask_ratio, training=True)  # true FLOPs
    model_macs_per_clip(model_cfg, clip_cfg, mask_ratio, training=True)   # MACs, papers' "FLOPs"
    count_model(model_cfg, clip_cfg, mask_ratio)                          # everything, by part
    cost_table(variants, ratios, num_classes=400, views=15)     # rows of `marscale cost`

Which tokens are visible does not change the cost, only how many: N - round(ratio * N).

Counting runs every op of the model through Python meta kernels (about a second for
ViT-L), so counts are cached in memory and on disk, in
`$MARSCALE_CACHE_DIR/flop_counts.json` (default `~/.cache/marscale`; set the variable to
an empty string to switch the disk cache off). Cached counts are keyed by the torch
version and a hash of the model, loss and counting sources, so a code change recounts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from marscale.clip import ClipConfig, num_tokens
from marscale.config import from_dict, to_dict
from marscale.losses import MARLoss
from marscale.model import VARIANTS, ModelConfig, build_model

log = logging.getLogger(__name__)

DISPLAY_NAMES = {
    "vit_tiny": "ViT-Ti",
    "vit_s": "ViT-S",
    "vit_b": "ViT-B",
    "vit_l": "ViT-L",
    "vit_h": "ViT-H",
    "vit_g": "ViT-g",
}
TABLE_VARIANTS = ("vit_s", "vit_b", "vit_l", "vit_h", "vit_g")
TABLE_RATIOS = (0.0, 0.5, 0.75)
KINETICS_VIEWS = 15
"""Kinetics-400 test protocol: 5 temporal clips x 3 spatial crops."""
REFERENCE_VARIANT = "vit_h"
"""Every row is also compared with this full-token model (the paper's 14.5% claim)."""

BACKWARD_NOTE = (
    "training = forward + backward per clip; backward counted as autograd runs it on the meta "
    "device: input and weight gradients of every matmul (2x forward), q/k/v gradients of "
    "attention (2x forward), weight gradient only for the tubelet embedding (the clip needs "
    "none); recomputation for gradient checkpointing not counted"
)
UNIT_NOTE = "GFLOPs as in the MAR/VideoMAE papers = 1e9 multiply-accumulates; hardware FLOPs are 2x"


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """Counted parameters and MACs of one model at one number of visible tokens (per clip)."""

    tokens: int
    """N, tokens per clip."""
    visible_tokens: int
    """Nv, tokens the encoder runs on."""
    params_inference: int
    """Encoder + classifier (bridging classifier or head)."""
    params_training: int
    """All trained parameters, incl. the reconstruction decoder."""
    macs_encoder: int
    """Forward MACs of the encoder (tubelet embedding on all N tokens + blocks on Nv)."""
    macs_classifier: int
    """Forward MACs of the bridging classifier (MAR) or the mean-pool head (full tokens)."""
    macs_decoder: int
    """Forward MACs of the reconstruction decoder (training only; 0 when it does not run)."""
    macs_backward: int
    """Backward MACs of one training step (see BACKWARD_NOTE)."""

    @property
    def macs_inference(self) -> int:
        return self.macs_encoder + self.macs_classifier

    @property
    def macs_training_forward(self) -> int:
        return self.macs_encoder + self.macs_classifier + self.macs_decoder

    @property
    def macs_training(self) -> int:
        return self.macs_training_forward + self.macs_backward


def _num_params(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _count_on_meta(cfg: ModelConfig, clip: ClipConfig, nv: int) -> ModelCount:
    model = build_model(cfg, clip, device="meta")
    model.train()
    n = num_tokens(clip, cfg.patch_size)
    video = torch.empty(1, 3, clip.num_frames, clip.img_size, clip.img_size, device="meta")
    visible_idx = masked_idx = None
    if nv < n:
        visible_idx = torch.arange(nv, device="meta").unsqueeze(0)  # [1, Nv]
        masked_idx = torch.arange(nv, n, device="meta").unsqueeze(0)  # [1, Nm]
    soft_target = torch.empty(1, cfg.num_classes, device="meta")

    # Forward and backward under separate counters: the forward's per-module split is
    # exact, while backward ops are not reliably attributed to the module they belong to.
    with FlopCounterMode(display=False) as fwd:
        out = model(video, visible_idx, masked_idx)
    loss = MARLoss(clip.tubelet_size, cfg.patch_size, clip.mean, clip.std, 1.0)(out, video, masked_idx, soft_target)
    loss = loss["loss"]
    with FlopCounterMode(display=False) as bwd:
        loss.backward()

    classifier = model.classifier if cfg.arch == "mar" else model.head
    decoder = getattr(model, "decoder", None)
    by_module = fwd.get_flop_counts()
    root = type(model).__name__

    def part(name: str) -> int:
        return sum(by_module.get(f"{root}.{name}", {}).values()) // 2

    parts = {"encoder": part("encoder"), "classifier": part("classifier" if cfg.arch == "mar" else "head")}
    parts["decoder"] = part("decoder") if decoder is not None else 0
    total = fwd.get_total_flops() // 2
    if sum(parts.values()) != total:
        raise RuntimeError(f"forward MACs by module {parts} do not add up to the total {total}")
    # The decoder runs in this training forward; at inference it is skipped, and encoder and
    # classifier do the same matmuls in eval mode (dropout and drop path are not matmuls).
    return ModelCount(
        tokens=n,
        visible_tokens=nv,
        params_inference=_num_params(model.encoder, classifier),
        params_training=_num_params(model),
        macs_encoder=parts["encoder"],
        macs_classifier=parts["classifier"],
        macs_decoder=parts["decoder"],
        macs_backward=bwd.get_total_flops() // 2,
    )


def _cache_file() -> Path | None:
    root = os.environ.get("MARSCALE_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marscale")
    return Path(root) / "flop_counts.json" if root else None


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    """torch version + the sources a count depends on (model, losses, this file)."""
    pkg = Path(__file__).resolve().parent
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted([*(pkg / "model").glob("*.py"), pkg / "losses.py", pkg / "cost.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("counts", {}) if doc.get("fingerprint") == _fingerprint() else {}


@functools.lru_cache(maxsize=None)
def _count(model_json: str, clip_json: str, num_visible: int) -> ModelCount:
    # Keyed on the configs as JSON text: the dataclasses are mutable, so not hashable.
    cfg = from_dict(ModelConfig, json.loads(model_json))
    clip = from_dict(ClipConfig, json.loads(clip_json))
    path = _cache_file()
    name = json.dumps({"model": json.loads(model_json), "clip": json.loads(clip_json), "visible": num_visible},
                      sort_keys=True)
    if path is not None:
        hit = _read_cache(path).get(name)
        if hit is not None:
            return ModelCount(**hit)
    count = _count_on_meta(cfg, clip, num_visible)
    if path is not None:
        # Re-read and merge just before writing, and replace atomically: several ranks
        # may count at once. Counts of an older fingerprint are dropped.
        counts = _read_cache(path)
        counts[name] = dataclasses.asdict(count)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"fingerprint": _fingerprint(), "counts": counts}, indent=1))
            os.replace(tmp, path)
        except OSError as err:  # a read-only home only costs a recount next time
            log.warning("could not write the FLOP count cache %s: %s", path, err)
    return count


def count_model(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float) -> ModelCount:
    """Parameters and per-clip MACs of `cfg` on clips shaped as `clip`, with `mask_ratio`
    of the tokens masked.

    Counted once per shape on the meta device and cached. `cfg.arch` picks the model
    (MAR or full-token ViT); `cfg.decoder` whether MAR training runs the decoder.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = num_tokens(clip, cfg.patch_size)
    # Dropout and stochastic depth cost no matmuls, and model FLOPs exclude the recomputation
    # of gradient checkpointing: they are switched off so the meta run has fewer ops.
    counted = dataclasses.replace(cfg, drop_path=0.0, head_dropout=0.0, grad_checkpointing=0, pretrained="")
    return _count(
        json.dumps(to_dict(counted), sort_keys=True), json.dumps(to_dict(clip), sort_keys=True), n - round(mask_ratio * n)
    )


def model_macs_per_clip(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float, training: bool) -> int:
    """Multiply-accumulates for one clip: the papers' "FLOPs" (ViT-B full: 180e9).

    training=False: one inference forward (encoder + classifier).
    training=True: forward (incl. the decoder for MAR) + backward.
    """
    count = count_model(cfg, clip, mask_ratio)
    return count.macs_training if training else count.macs_inference


def model_flops_per_clip(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float, training: bool) -> int:
    """True hardware FLOPs for one clip (2 x MACs): the numerator of TFLOP/s and MFU."""
    return 2 * model_macs_per_clip(cfg, clip, mask_ratio, training)


# ----------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class CostRow:
    """One line of `marscale cost`. MACs are per clip; ratios compare MACs."""

    variant: str
    model: str
    setting: str
    mask_ratio: float
    tokens: int
    visible_tokens: int
    params_inference: int
    params_training: int
    macs_encoder: int
    macs_classifier: int
    macs_decoder: int
    macs_view: int
    """Inference, one view."""
    views: int
    macs_multiview: int
    """Inference over the multi-view test protocol (views x macs_view)."""
    macs_training: int
    """Forward + backward of one training clip."""
    view_vs_full: float
    """macs_view / the full-token model of the same size."""
    view_vs_vit_h: float
    """macs_view / full-token ViT-H."""
    training_vs_full: float
    training_vs_vit_h: float


def _setting(ratio: float) -> str:
    return "full" if ratio == 0 else f"MAR {round(ratio * 100)}%"


def _config(variant: str, ratio: float, num_classes: int) -> tuple[ModelConfig, ClipConfig]:
    # Ratio 0 is the standard full-token baseline; any masking means a MAR model. The
    # clip is the standard one: 16 x 224 x 224, tubelets 2 x patch x patch.
    return ModelConfig(num_classes=num_classes, arch="vit" if ratio == 0 else "mar", variant=variant), ClipConfig()


def cost_table(
    variants: Sequence[str] = TABLE_VARIANTS,
    ratios: Sequence[float] = TABLE_RATIOS,
    num_classes: int = 400,
    views: int = KINETICS_VIEWS,
) -> list[CostRow]:
    """Rows for each variant x mask ratio (0 = full tokens) at the variant's standard clip
    (16 x 224 x 224; tubelets 2 x patch x patch)."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    reference = count_model(*_config(REFERENCE_VARIANT, 0.0, num_classes), 0.0)
    rows = []
    for variant in variants:
        full = count_model(*_config(variant, 0.0, num_classes), 0.0)
        for ratio in ratios:
            c = count_model(*_config(variant, ratio, num_classes), ratio)
            rows.append(
                CostRow(
                    variant=variant,
                    model=DISPLAY_NAMES.get(variant, variant),
                    setting=_setting(ratio),
                    mask_ratio=ratio,
                    tokens=c.tokens,
                    visible_tokens=c.visible_tokens,
                    params_inference=c.params_inference,
                    params_training=c.params_training,
                    macs_encoder=c.macs_encoder,
                    macs_classifier=c.macs_classifier,
                    macs_decoder=c.macs_decoder,
                    macs_view=c.macs_inference,
                    views=views,
                    macs_multiview=views * c.macs_inference,
                    macs_training=c.macs_training,
                    view_vs_full=c.macs_inference / full.macs_inference,
                    view_vs_vit_h=c.macs_inference / reference.macs_inference,
                    training_vs_full=c.macs_training / full.macs_training,
                    training_vs_vit_h=c.macs_training / reference.macs_training,
                )
            )
    return rows


@dataclasses.dataclass(frozen=True)
class ClaimTerm:
    name: str
    value: float


def vit_h_claim_terms(num_classes: int = 400, views: int = KINETICS_VIEWS) -> list[ClaimTerm]:
    """Every ratio MAR ViT-L / full ViT-H this module can count, for the paper's
    "MAR ViT-L costs 14.5% of ViT-H" (whose accounting the per-view figures do not pin down)."""
    h = count_model(*_config("vit_h", 0.0, num_classes), 0.0)
    terms = []
    for ratio in (0.5, 0.75):
        lm = count_model(*_config("vit_l", ratio, num_classes), ratio)
        tag = _setting(ratio)
        terms += [
            ClaimTerm(f"{tag} ViT-L / ViT-H, inference per view", lm.macs_inference / h.macs_inference),
            # Both are tested with the same protocol, so this equals the per-view ratio;
            # it is listed because a multi-view total is one way the claim could be read.
            ClaimTerm(
                f"{tag} ViT-L / ViT-H, inference over {views} views (both use the same protocol)",
                views * lm.macs_inference / (views * h.macs_inference),
            ),
            ClaimTerm(
                f"{tag} ViT-L / ViT-H, training per clip (fwd+bwd, MAR incl. decoder)",
                lm.macs_training / h.macs_training,
            ),
        ]
    lm = count_model(*_config("vit_l", 0.5, num_classes), 0.5)
    terms.append(ClaimTerm("MAR ViT-L / ViT-H, inference parameters", lm.params_inference / h.params_inference))
    return terms


def claim_paragraph(terms: list[ClaimTerm], claimed: float = 0.145) -> str:
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
