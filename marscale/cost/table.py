"""The rows of `marscale cost` and the ratios behind the paper's "MAR ViT-L costs 14.5% of ViT-H".

Numbers only, all from `marscale.cost.counting.count_model`; `marscale.commands.cost` turns them
into text. Every row is at the variant's standard clip (16 x 224 x 224, tubelets
2 x patch x patch) and is compared with the full-token model of its own size and with
full-token ViT-H.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from marscale.core.clip import ClipConfig
from marscale.cost.counting import count_model
from marscale.model import VARIANTS, ModelConfig

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
    # Ratio 0 is the standard full-token baseline; any masking means a MAR model. The clip
    # is the standard one: 16 x 224 x 224, tubelets 2 x patch x patch.
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
    """One way to read the paper's claim: a named ratio MAR ViT-L / full ViT-H."""

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
