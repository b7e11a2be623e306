"""marscale.cost_table: the rows of `marscale cost` compare the counted MACs they claim to."""

from __future__ import annotations

import pytest

from marscale import cost, cost_table
from marscale.clip import ClipConfig
from marscale.model import ModelConfig

K = 400  # Kinetics-400 head


@pytest.fixture(scope="module", autouse=True)
def no_disk_cache():
    """Never read or write the user's count cache; counts stay in this process's memory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARSCALE_CACHE_DIR", "")
        yield


def count(variant: str, ratio: float) -> cost.ModelCount:
    model = ModelConfig(num_classes=K, arch="vit" if ratio == 0 else "mar", variant=variant)
    return cost.count_model(model, ClipConfig(), ratio)


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
    terms = {t.name: t.value for t in cost_table.vit_h_claim_terms(K, views=15)}
    h, l75 = count("vit_h", 0.0), count("vit_l", 0.75)
    assert terms["MAR 75% ViT-L / ViT-H, inference per view"] == l75.macs_inference / h.macs_inference
    assert terms["MAR 75% ViT-L / ViT-H, training per clip (fwd+bwd, MAR incl. decoder)"] == (
        l75.macs_training / h.macs_training
    )
    assert len(terms) == 7
