"""The MAR presets run the MAR reference recipe; the baselines keep VideoMAE's behaviour.

The expected values are written here (from the reference code, as docs/recipe.md lists
them), not read from the presets or the doc, so a preset that drifts fails.
"""

from __future__ import annotations

import pytest

from marscale.data.config import SSV2_FLIP_LABEL_PAIRS
from marscale.engine.config import load_train_config

SSV2_PAIRS = ((86, 87), (93, 94), (166, 167))

# preset: (lr, layer_decay, epochs, clips per GPU, clips per video, drop path, head dropout,
#          recon weight, (test clips, crops), initial weights)
HYPER = {
    "mar_vit_b_k400": (1e-3, 0.65, 100, 16, 2, 0.1, 0.0, 0.01, (5, 3), "videomae_vit_b_k400_pretrain.pth"),
    "mar_vit_l_k400": (5e-4, 0.75, 60, 8, 2, 0.2, 0.1, 0.01, (5, 3), "videomae_vit_l_k400_pretrain.pth"),
    "mar_vit_h_k400": (5e-4, 0.8, 50, 8, 2, 0.2, 0.1, 0.01, (5, 3), "videomae_vit_h_k400_pretrain.pth"),
    "mar_vit_b_ssv2": (1e-3, 0.75, 40, 16, 1, 0.1, 0.1, 0.1, (2, 3), "videomae_vit_b_ssv2_pretrain.pth"),
    # SSv2 ViT-L starts from the Kinetics-400 pre-trained ViT-L in the reference.
    "mar_vit_l_ssv2": (2.5e-4, 0.75, 40, 2, 1, 0.2, 0.1, 0.1, (2, 3), "videomae_vit_l_k400_pretrain.pth"),
}
K400 = ("mar_vit_b_k400", "mar_vit_l_k400", "mar_vit_h_k400")
SSV2 = ("mar_vit_b_ssv2", "mar_vit_l_ssv2")
BASELINES = ("vit_b_k400", "vit_l_k400", "vit_h_k400")


@pytest.mark.parametrize("name", K400 + SSV2)
def test_mar_presets_run_the_reference_recipe(name):
    cfg = load_train_config(name)
    lr, decay, epochs, batch, clips, drop_path, head_dropout, recon, views, weights = HYPER[name]
    o, d, m, c, k = cfg.optim, cfg.data, cfg.model, cfg.clip, cfg.masking
    assert (o.lr, o.layer_decay, o.epochs) == (lr, decay, epochs)
    assert (d.batch_size, d.clips_per_video, m.drop_path, m.head_dropout, o.recon_weight) == (
        batch, clips, drop_path, head_dropout, recon,
    )
    assert (d.test_num_clips, d.test_num_crops) == views
    assert m.pretrained.endswith(weights)
    # Behaviour that differs from VideoMAE:
    assert o.layer_decay_scope == "weights" and o.schedule == "cosine_whole_run"
    assert m.arch == "mar" and m.bridge.init == "xavier"
    assert m.decoder.enabled
    # Common recipe:
    assert (o.weight_decay, o.betas, o.warmup_epochs, o.warmup_lr, o.min_lr) == (0.05, (0.9, 0.999), 5.0, 1e-6, 1e-6)
    assert (d.mixup, d.cutmix, d.label_smoothing, d.random_erasing) == (0.8, 1.0, 0.1, 0.25)
    assert d.rand_augment == "rand-m9-mstd0.5-inc1" and (d.rrc_scale, d.rrc_ratio) == ((0.08, 1.0), (0.75, 1.3333))
    assert (c.num_frames, c.img_size, c.tubelet_size) == (16, 224, 2)
    assert (c.mean, c.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (k.kind, k.ratio, k.cell, k.per_cell_phase, k.temporal_shuffle) == ("cell_running", 0.5, (2, 2), False, True)
    assert not k.eval_complement and not k.eval_temporal_shuffle  # reference options, off
    assert cfg.deepspeed.precision == "bf16"
    if name in K400:
        assert (c.sampling, c.sampling_interval, c.sampling_fps) == ("dense", 4, 30.0)
        assert d.clip_windows == "independent" and d.rand_augment_before_crop
        assert d.flip and d.flip_label_pairs == ()
    else:
        assert c.sampling == "segment" and c.sampling_fps is None
        assert c.segment_rule == "reference"  # linspace(0, L, 17) segments, half-even rounding
        assert not d.rand_augment_before_crop  # after the crop for SSv2
        assert d.flip and d.flip_label_pairs == SSV2_PAIRS == SSV2_FLIP_LABEL_PAIRS


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_keep_videomae_behaviour(name):
    cfg = load_train_config(name)
    mar = load_train_config("mar_" + name)
    o, d, c = cfg.optim, cfg.data, cfg.clip
    assert cfg.model.arch == "vit" and cfg.masking.kind == "none" and not cfg.model.decoder.enabled
    assert o.layer_decay_scope == "all" and o.schedule == "warmup_then_cosine"
    assert c.sampling_fps is None and d.clip_windows == "shared" and d.rand_augment_before_crop
    # The same hyper-parameters as the MAR preset of the size, so the comparison is fair.
    assert (o.lr, o.layer_decay, o.epochs, d.batch_size, d.clips_per_video) == (
        mar.optim.lr, mar.optim.layer_decay, mar.optim.epochs, mar.data.batch_size, mar.data.clips_per_video,
    )
