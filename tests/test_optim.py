"""Parameter groups, optimizer choice and lr schedule (engine/optim.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from marscale.core.config import from_dict
from marscale.engine.config import OptimConfig
from marscale.engine.optim import apply_lr, build_optimizer, layer_id, lr_at, param_groups
from marscale.core.clip import ClipConfig
from marscale.model import ModelConfig, build_model

DEPTH = 6  # vit_tiny


def small_model(arch: str = "mar"):
    cfg = ModelConfig(num_classes=4, arch=arch, variant="vit_tiny")
    return build_model(cfg, ClipConfig(num_frames=4, img_size=32))


def optim_cfg(**kw) -> OptimConfig:
    return from_dict(OptimConfig, {"lr": 1e-3, "epochs": 1, **kw})


def group_of(groups: list[dict], model, name: str) -> dict:
    param = dict(model.named_parameters())[name]
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_layer_ids():
    assert layer_id("encoder.patch_embed.proj.weight", 12) == 0
    assert layer_id("encoder.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("encoder.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("encoder.norm.weight", 12) == 13
    assert layer_id("decoder.mask_token", 12) == 13
    assert layer_id("decoder.blocks.0.attn.qkv.weight", 12) == 13  # decoder blocks are not encoder blocks
    assert layer_id("classifier.blocks.1.norm1.weight", 12) == 13
    assert layer_id("head.head.weight", 12) == 13
    assert layer_id("module.encoder.blocks.3.norm1.weight", 12) == 4


@pytest.mark.parametrize("arch", ["mar", "vit"])
def test_every_trainable_param_in_exactly_one_group(arch):
    model = small_model(arch)
    groups = param_groups(model, 0.05, 0.75, DEPTH, "all")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert len({g["name"] for g in groups}) == len(groups)


def test_weight_decay_membership_mar():
    model = small_model("mar")
    groups = param_groups(model, 0.05, 0.75, DEPTH, "all")
    no_decay = [
        "encoder.patch_embed.proj.bias",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.norm1.bias",
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.attn.v_bias",
        "encoder.blocks.5.mlp.fc1.bias",
        "encoder.norm.weight",
        "decoder.mask_token",
        "decoder.norm.bias",
        "classifier.head.fc_norm.weight",
        "classifier.head.head.bias",
    ]
    decay = [
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.attn.proj.weight",
        "encoder.blocks.3.mlp.fc2.weight",
        "decoder.encoder_to_decoder.weight",
        "decoder.head.weight",
        "classifier.embed.weight",
        "classifier.head.head.weight",
    ]
    for name in no_decay:
        assert group_of(groups, model, name)["weight_decay"] == 0.0, name
    for name in decay:
        assert group_of(groups, model, name)["weight_decay"] == 0.05, name
    # Every 1-D parameter is in a no-decay group.
    for name, p in model.named_parameters():
        if p.ndim <= 1:
            assert group_of(groups, model, name)["weight_decay"] == 0.0, name


def test_layer_scales():
    model = small_model("mar")
    groups = param_groups(model, 0.05, 0.5, DEPTH, "all")
    # scale = 0.5 ** (DEPTH + 1 - layer id)
    assert group_of(groups, model, "encoder.patch_embed.proj.weight")["lr_scale"] == 0.5**7
    assert group_of(groups, model, "encoder.blocks.0.attn.qkv.weight")["lr_scale"] == 0.5**6
    assert group_of(groups, model, "encoder.blocks.5.attn.qkv.weight")["lr_scale"] == 0.5**1
    assert group_of(groups, model, "encoder.norm.weight")["lr_scale"] == 1.0
    assert group_of(groups, model, "decoder.blocks.0.attn.qkv.weight")["lr_scale"] == 1.0
    assert group_of(groups, model, "classifier.head.head.weight")["lr_scale"] == 1.0
    assert group_of(groups, model, "encoder.blocks.2.attn.q_bias")["name"] == "layer3_no_decay"
    assert group_of(groups, model, "encoder.blocks.2.attn.qkv.weight")["name"] == "layer3_decay"
    # Groups come ordered by layer id: 0 .. DEPTH+1, decay before no-decay.
    assert [g["name"] for g in groups[:3]] == ["layer0_decay", "layer0_no_decay", "layer1_decay"]
    assert groups[-1]["name"] == f"layer{DEPTH + 1}_no_decay"
    vit = small_model("vit")
    vit_groups = param_groups(vit, 0.05, 0.5, DEPTH, "all")
    assert group_of(vit_groups, vit, "head.head.weight")["lr_scale"] == 1.0
    assert group_of(vit_groups, vit, "head.fc_norm.weight")["weight_decay"] == 0.0


# Every kind of parameter of a K400 ViT-B MAR model (layer_decay 0.65, depth 12, wd 0.05):
# (lr scale, weight decay) under each scope, written out.
VIT_B_WEIGHTS_SCOPE = {
    "encoder.patch_embed.proj.weight": (0.65**13, 0.05),
    "encoder.patch_embed.proj.bias": (1.0, 0.0),
    "encoder.blocks.0.norm1.weight": (1.0, 0.0),
    "encoder.blocks.0.norm1.bias": (1.0, 0.0),
    "encoder.blocks.0.attn.q_bias": (1.0, 0.0),
    "encoder.blocks.0.attn.v_bias": (1.0, 0.0),
    "encoder.blocks.0.attn.qkv.weight": (0.65**12, 0.05),
    "encoder.blocks.0.attn.proj.weight": (0.65**12, 0.05),
    "encoder.blocks.0.attn.proj.bias": (1.0, 0.0),
    "encoder.blocks.0.mlp.fc1.weight": (0.65**12, 0.05),
    "encoder.blocks.5.mlp.fc1.bias": (1.0, 0.0),
    "encoder.blocks.5.norm2.weight": (1.0, 0.0),
    "encoder.blocks.11.mlp.fc2.weight": (0.65, 0.05),
    "encoder.blocks.11.mlp.fc2.bias": (1.0, 0.0),
    "encoder.norm.weight": (1.0, 0.0),
    "encoder.norm.bias": (1.0, 0.0),
    "decoder.mask_token": (0.65**13, 0.05),
    "decoder.encoder_to_decoder.weight": (1.0, 0.05),
    "decoder.blocks.3.attn.qkv.weight": (1.0, 0.05),
    "decoder.blocks.3.attn.v_bias": (1.0, 0.0),
    "decoder.blocks.3.norm1.weight": (1.0, 0.0),
    "decoder.norm.bias": (1.0, 0.0),
    "decoder.head.weight": (1.0, 0.05),
    "decoder.head.bias": (1.0, 0.0),
    "classifier.embed.weight": (1.0, 0.05),
    "classifier.blocks.1.mlp.fc1.weight": (1.0, 0.05),
    "classifier.blocks.1.mlp.fc1.bias": (1.0, 0.0),
    "classifier.head.fc_norm.weight": (1.0, 0.0),
    "classifier.head.head.weight": (1.0, 0.05),
    "classifier.head.head.bias": (1.0, 0.0),
}
VIT_B_ALL_SCOPE = {
    **VIT_B_WEIGHTS_SCOPE,  # weight matrices agree; biases, norms and the mask token differ
    "encoder.patch_embed.proj.bias": (0.65**13, 0.0),
    "encoder.blocks.0.norm1.weight": (0.65**12, 0.0),
    "encoder.blocks.0.norm1.bias": (0.65**12, 0.0),
    "encoder.blocks.0.attn.q_bias": (0.65**12, 0.0),
    "encoder.blocks.0.attn.v_bias": (0.65**12, 0.0),
    "encoder.blocks.0.attn.proj.bias": (0.65**12, 0.0),
    "encoder.blocks.5.mlp.fc1.bias": (0.65**7, 0.0),
    "encoder.blocks.5.norm2.weight": (0.65**7, 0.0),
    "encoder.blocks.11.mlp.fc2.bias": (0.65, 0.0),
    "decoder.mask_token": (1.0, 0.0),
}


def expected_scale_and_wd(name: str, scope: str, depth: int, decay: float, wd: float) -> tuple[float, float]:
    """The rules of each scope restated over parameter names (see OptimConfig.layer_decay_scope)."""
    block = re.match(r"encoder\.blocks\.(\d+)\.", name)
    by_layer = decay ** (depth + 1) if name.startswith("encoder.patch_embed.") else 1.0
    if block:
        by_layer = decay ** (depth - int(block.group(1)))
    bias_or_norm = name.endswith("bias") or "norm" in name
    if scope == "all":
        return by_layer, (0.0 if bias_or_norm or name.endswith("mask_token") else wd)
    if name.endswith("mask_token"):
        return decay ** (depth + 1), wd
    return (1.0, 0.0) if bias_or_norm else (by_layer, wd)


def scale_and_wd_by_name(model, opt) -> dict[str, tuple[float, float]]:
    of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {name: of[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("scope", ["weights", "all"])
@pytest.mark.parametrize(
    "arch, variant, depth, decay",
    [("mar", "vit_b", 12, 0.65), ("mar", "vit_l", 24, 0.75), ("vit", "vit_b", 12, 0.65)],
)
def test_layer_decay_scope_every_parameter(arch, variant, depth, decay, scope):
    model = build_model(ModelConfig(num_classes=400, arch=arch, variant=variant), ClipConfig(), device="meta")
    opt = build_optimizer(model, optim_cfg(layer_decay=decay, layer_decay_scope=scope, weight_decay=0.05), "cpu")
    got = scale_and_wd_by_name(model, opt)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    for name, (scale, wd) in got.items():
        want_scale, want_wd = expected_scale_and_wd(name, scope, depth, decay, 0.05)
        assert scale == pytest.approx(want_scale, rel=1e-12), name
        assert wd == want_wd, name
    if arch == "mar" and variant == "vit_b":
        table = VIT_B_WEIGHTS_SCOPE if scope == "weights" else VIT_B_ALL_SCOPE
        for name, (scale, wd) in table.items():
            assert got[name] == (pytest.approx(scale, rel=1e-12), wd), name
    if arch == "mar" and variant == "vit_l":
        want = {
            "weights": {
                "decoder.mask_token": (0.75**25, 0.05),
                "encoder.patch_embed.proj.weight": (0.75**25, 0.05),
                "encoder.patch_embed.proj.bias": (1.0, 0.0),
                "encoder.blocks.0.attn.qkv.weight": (0.75**24, 0.05),
                "encoder.blocks.0.attn.q_bias": (1.0, 0.0),
                "encoder.blocks.23.mlp.fc2.weight": (0.75, 0.05),
                "encoder.blocks.23.norm2.bias": (1.0, 0.0),
                "decoder.blocks.11.mlp.fc1.weight": (1.0, 0.05),
            },
            "all": {
                "decoder.mask_token": (1.0, 0.0),
                "encoder.patch_embed.proj.weight": (0.75**25, 0.05),
                "encoder.patch_embed.proj.bias": (0.75**25, 0.0),
                "encoder.blocks.0.attn.qkv.weight": (0.75**24, 0.05),
                "encoder.blocks.0.attn.q_bias": (0.75**24, 0.0),
                "encoder.blocks.23.mlp.fc2.weight": (0.75, 0.05),
                "encoder.blocks.23.norm2.bias": (0.75, 0.0),
                "decoder.blocks.11.mlp.fc1.weight": (1.0, 0.05),
            },
        }[scope]
        for name, (scale, wd) in want.items():
            assert got[name] == (pytest.approx(scale, rel=1e-12), wd), name


def test_layer_decay_scope_default_is_videomae():
    assert optim_cfg().layer_decay_scope == "all" and optim_cfg().schedule == "warmup_then_cosine"


def test_frozen_params_left_out():
    model = small_model("vit")
    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups(model, 0.05, 0.75, DEPTH, "all")
    assert all(p is not model.encoder.patch_embed.proj.weight for g in groups for p in g["params"])


def test_build_optimizer_on_cpu_and_apply_lr():
    model = small_model("mar")
    opt = build_optimizer(model, optim_cfg(layer_decay=0.5, betas=[0.8, 0.99], eps=1e-6), "cpu")
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-6
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    apply_lr(opt, 2e-4)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-4 * g["lr_scale"])
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["layer0_decay"]["lr"] == pytest.approx(2e-4 * 0.5**7)
    assert by_name[f"layer{DEPTH + 1}_decay"]["lr"] == pytest.approx(2e-4)

    # One step: decay applies to weights only, with each group's own lr.
    params = dict(model.named_parameters())
    w, b = params["encoder.blocks.0.attn.qkv.weight"], params["encoder.blocks.0.attn.q_bias"]
    with torch.no_grad():
        b.fill_(1.0)
    w0, b0 = w.detach().clone(), b.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    lr_w = 2e-4 * 0.5**6
    torch.testing.assert_close(w.detach(), w0 * (1 - lr_w * 0.05))
    torch.testing.assert_close(b.detach(), b0)


def test_fused_choice():
    model = small_model("vit")
    assert build_optimizer(model, optim_cfg(fused="none"), "cpu").defaults["foreach"] is False
    assert build_optimizer(model, optim_cfg(fused="torch"), "cpu").defaults["fused"] is True
    with pytest.raises(ValueError, match="needs CUDA"):
        build_optimizer(model, optim_cfg(fused="deepspeed"), "cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        build_optimizer(model, optim_cfg(fused="apex"), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda():
    model = small_model("vit").cuda()
    assert build_optimizer(model, optim_cfg(), "cuda").defaults["fused"] is True


def test_schedule_values():
    kw = dict(base_lr=1e-3, min_lr=1e-6, warmup_lr=1e-7, warmup_steps=10, total_steps=110)
    kw["schedule"] = "warmup_then_cosine"
    assert lr_at(0, **kw) == pytest.approx(1e-7)
    assert lr_at(5, **kw) == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # end of warm-up = peak
    assert lr_at(60, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # cosine midpoint
    assert lr_at(35, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert lr_at(500, **kw) == pytest.approx(1e-6)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert all(a <= b for a, b in zip(lrs[:11], lrs[1:11]))  # rises through warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only falls
    # No warm-up: starts at the peak.
    short = dict(schedule="warmup_then_cosine", base_lr=1.0, min_lr=0.0, warmup_lr=0.0)
    assert lr_at(0, **short, warmup_steps=0, total_steps=4) == 1.0
    assert lr_at(2, **short, warmup_steps=0, total_steps=4) == pytest.approx(0.5)
    # Warm-up as long as the run: never decays.
    assert lr_at(4, **short, warmup_steps=8, total_steps=8) == pytest.approx(0.5)


def test_schedule_cosine_whole_run_values():
    kw = dict(base_lr=1e-3, min_lr=1e-6, warmup_lr=1e-7, warmup_steps=10, total_steps=110)
    kw["schedule"] = "cosine_whole_run"

    def cosine(step):  # min + (base - min) (1 + cos(pi step / total)) / 2, over the whole run
        return 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * step / 110)) / 2

    assert lr_at(0, **kw) == pytest.approx(1e-7)
    assert lr_at(4, **kw) == pytest.approx(1e-7 + (cosine(10) - 1e-7) * 4 / 10)  # line to the cosine at step 10
    assert lr_at(10, **kw) == pytest.approx(cosine(10))  # the peak, below base_lr
    assert lr_at(10, **kw) < 1e-3
    for step in (11, 35, 55, 80, 109):
        assert lr_at(step, **kw) == pytest.approx(cosine(step), rel=1e-12), step
    assert lr_at(55, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # midpoint of the run, not of the decay
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert lr_at(500, **kw) == pytest.approx(1e-6)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert max(lrs) == lrs[10]
    assert all(a <= b for a, b in zip(lrs[:11], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # Without warm-up both forms are the same cosine.
    for step in range(0, 121, 7):
        same = dict(base_lr=1e-3, min_lr=1e-6, warmup_lr=1e-7, warmup_steps=0, total_steps=110)
        assert lr_at(step, schedule="cosine_whole_run", **same) == pytest.approx(
            lr_at(step, schedule="warmup_then_cosine", **same), rel=1e-12
        )


def test_schedule_k400_vit_b_peak():
    """K400 ViT-B: lr 1e-3, min 1e-6, warm-up from 1e-6 for 5 of 100 epochs (1000 steps each)."""
    kw = dict(base_lr=1e-3, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=5_000, total_steps=100_000)
    peak = lr_at(5_000, schedule="cosine_whole_run", **kw)
    assert peak == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 5 / 100)) / 2, rel=1e-12)
    assert f"{peak:.2e}" == "9.94e-04"  # FACTS: "9.94e-4 for K400 ViT-B"
    assert lr_at(2_500, schedule="cosine_whole_run", **kw) == pytest.approx((1e-6 + peak) / 2)  # the warm-up line
    assert max(lr_at(s, schedule="cosine_whole_run", **kw) for s in range(0, 100_001, 50)) == peak
    assert lr_at(5_000, schedule="warmup_then_cosine", **kw) == 1e-3  # VideoMAE's form reaches lr


def test_schedule_unknown_form():
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(0, schedule="cosine", base_lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_steps=0, total_steps=4)
