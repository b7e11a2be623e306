"""marscale.cost.table: the rows of `marscale cost` compare the counted MACs they claim to."""

from __future__ import annotations

import pytest
from helpers import count_standard as count

from marscale.cost import table as cost_table


def test_ratios_in_table():
    rows = cost_table.cost_table(["vit_l"], [0.0, 0.5])
    full, mar = rows
    assert full.view_vs_full == 1.0 and full.setting == "full" and mar.setting == "MAR 50%"
    assert mar.view_vs_full == pytest.approx(mar.macs_view / full.macs_view)
    h = count("vit_h", 0.0)
    assert mar.view_vs_vit_h == pytest.approx(mar.macs_view / h.macs_inference)
    assert mar.training_vs_vit_h == pytest.approx(mar.macs_training / h.macs_training)
    assert mar.macs_multiview == 15 * mar.macs_view


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="vit_q"):
        cost_table.cost_table(["vit_q"], [0.0])


def test_claim_terms_are_mar_vit_l_over_full_vit_h():
    terms = {t.name: t.value for t in cost_table.vit_h_claim_terms(400, views=15)}
    h, l75 = count("vit_h", 0.0), count("vit_l", 0.75)
    assert terms["MAR 75% ViT-L / ViT-H, inference per view"] == l75.macs_inference / h.macs_inference
    assert terms["MAR 75% ViT-L / ViT-H, training per clip (fwd+bwd, MAR incl. decoder)"] == (
        l75.macs_training / h.macs_training
    )
    assert len(terms) == 7
