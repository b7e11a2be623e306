"""marscale.cost.counting: counted FLOPs against the analytic formula and the published figures.

Counts run on the meta device; each distinct model is counted once per test module (the
in-memory cache) into a fresh disk cache under a temporary directory.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tokens_of
from torch.utils.flop_counter import FlopCounterMode

from marscale.cost import counting as cost
from marscale.core.clip import ClipConfig
from marscale.model import VARIANTS, DecoderConfig, ModelConfig, build_model
from marscale.model.config import DecoderSpec

K = 400  # Kinetics-400 head
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """Count afresh into a private disk cache (never the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARSCALE_CACHE_DIR", str(tmp_path_factory.mktemp("flop_cache")))
        cost._count.cache_clear()
        yield
    cost._count.cache_clear()


CLIP_KEYS = ("num_frames", "img_size", "tubelet_size")


def count(variant: str, ratio: float, **kw) -> cost.ModelCount:
    arch = "vit" if ratio == 0 else "mar"
    clip = ClipConfig(**{k: kw.pop(k) for k in CLIP_KEYS if k in kw})
    cfg = ModelConfig(num_classes=kw.pop("num_classes", K), arch=arch, variant=variant, **kw)
    return cost.count_model(cfg, clip, ratio)


# ----------------------------------------------------------------- analytic formula


def blocks(depth: int, d: int, n: int, mlp_ratio: float = 4.0) -> int:
    """MACs of `depth` transformer blocks of width d on n tokens: qkv + proj (4 d^2 n),
    MLP (2 d h n), attention scores and weighted sum (2 d n^2). With h = 4d this is the
    FACTS formula L * (12 d^2 N + 2 d N^2)."""
    hidden = int(round(d * mlp_ratio))
    return depth * ((4 * d * d + 2 * d * hidden) * n + 2 * d * n * n)


def encoder(variant: str, n: int, nv: int, tubelet: int = 2) -> int:
    """Tubelet embedding on all n tokens + blocks on the nv visible ones."""
    e = VARIANTS[variant].encoder
    return 3 * tubelet * e.patch_size**2 * e.embed_dim * n + blocks(e.depth, e.embed_dim, nv, e.mlp_ratio)


def bridging(variant: str, nv: int, k: int = K) -> int:
    """Linear d -> 512 on nv tokens, 2 blocks of width 512, head 512 -> k on the pooled token."""
    d = VARIANTS[variant].encoder.embed_dim
    return d * 512 * nv + blocks(2, 512, nv) + 512 * k


def decoder(variant: str, n: int, nv: int, tubelet: int = 2, spec: DecoderSpec | None = None) -> int:
    """Linear d -> Dd on visible, blocks on all n tokens, head Dd -> P on the masked ones
    (the variant's decoder unless `spec` is given)."""
    enc, dec = VARIANTS[variant].encoder, spec or VARIANTS[variant].decoder
    dd, p = dec.embed_dim, 3 * tubelet * enc.patch_size**2
    return enc.embed_dim * dd * nv + blocks(dec.depth, dd, n) + dd * p * (n - nv)


def test_blocks_formula_is_the_facts_formula():
    assert blocks(12, 768, 1568) == 12 * (12 * 768**2 * 1568 + 2 * 768 * 1568**2)


@pytest.mark.parametrize(
    "variant,ratio",
    [("vit_b", 0.0), ("vit_b", 0.5), ("vit_l", 0.75), ("vit_tiny", 0.5)],
)
def test_counted_parts_equal_formula_exactly(variant, ratio):
    # FlopCounterMode counts matmul/conv/attention MACs only (bias adds, norms and GELU
    # are not counted, nor are they in the formula), so every part matches to the MAC.
    c = count(variant, ratio)
    n, nv = c.tokens, c.visible_tokens
    assert nv == n - round(ratio * n)
    assert c.macs_encoder == encoder(variant, n, nv)
    if ratio == 0:
        assert c.macs_classifier == VARIANTS[variant].encoder.embed_dim * K  # mean pool -> Linear
        assert c.macs_decoder == 0
    else:
        assert c.macs_classifier == bridging(variant, nv)
        assert c.macs_decoder == decoder(variant, n, nv)


def test_vit_g_patch14_and_mlp_ratio():
    # 8 x 16 x 16 = 2048 tokens; MLP hidden 1408 * 48/11 = 6144.
    c = count("vit_g", 0.5)
    assert (c.tokens, c.visible_tokens) == (2048, 1024)
    assert c.macs_encoder == encoder("vit_g", 2048, 1024)
    assert c.macs_decoder == decoder("vit_g", 2048, 1024)


def test_per_view_total_vs_encoder_formula_tolerance():
    # The FACTS formula covers the encoder only; the full-token head (d x K MACs on one
    # pooled token) is what it leaves out: 768 * 400 / 180e9 = 1.7e-6 of ViT-B.
    c = count("vit_b", 0.0)
    formula = encoder("vit_b", 1568, 1568)
    rel = (c.macs_inference - formula) / formula
    assert 0 < rel < 2e-6


def test_backward_is_twice_forward_except_the_clip_gradient():
    # Every matmul's backward computes the input and the weight gradient (2 x its
    # forward); the tubelet embedding computes only its weight gradient (the clip needs none).
    for variant, ratio in (("vit_b", 0.0), ("vit_b", 0.5)):
        c = count(variant, ratio)
        patch_embed = 3 * 2 * 16 * 16 * VARIANTS[variant].encoder.embed_dim * c.tokens
        assert c.macs_backward == 2 * c.macs_training_forward - patch_embed


def test_inference_count_matches_an_eval_mode_forward():
    # count_model takes inference MACs from the training forward's encoder + classifier;
    # check that equals a plain eval-mode forward (decoder skipped).
    cfg = ModelConfig(num_classes=K, arch="mar", variant="vit_tiny")
    model = build_model(cfg, ClipConfig(), device="meta").eval()
    video = torch.empty(1, 3, 16, 224, 224, device="meta")
    tokens = tokens_of(torch.arange(784).unsqueeze(0), 1568).to("meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(video, tokens)
    assert fc.get_total_flops() // 2 == cost.count_model(cfg, ClipConfig(), 0.5).macs_inference


# -------------------------------------------------------------- published figures


@pytest.mark.parametrize(
    "variant,ratio,published",
    [
        ("vit_s", 0.0, 57),
        ("vit_b", 0.0, 180),
        ("vit_l", 0.0, 597),
        ("vit_h", 0.0, 1192),
        ("vit_b", 0.5, 86),
        ("vit_l", 0.5, 276),
        ("vit_b", 0.75, 41),
        ("vit_l", 0.75, 131),
    ],
)
def test_published_gflops_within_1_percent(variant, ratio, published):
    assert count(variant, ratio).macs_inference / 1e9 == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("variant", ["vit_b", "vit_l"])
def test_mar50_at_least_52_percent_cheaper(variant):
    assert count(variant, 0.5).macs_inference <= 0.48 * count(variant, 0.0).macs_inference


@pytest.mark.parametrize("variant,millions", [("vit_b", 86), ("vit_l", 304), ("vit_h", 632)])
def test_parameters(variant, millions):
    c = count(variant, 0.0)
    assert c.params_inference / 1e6 == pytest.approx(millions, rel=0.01)
    assert c.params_training == c.params_inference  # no decoder in the baseline


def test_mar_parameters_split():
    c = count("vit_b", 0.5)
    cfg = ModelConfig(num_classes=K, arch="mar", variant="vit_b")
    model = build_model(cfg, ClipConfig(), device="meta")
    dec = sum(p.numel() for p in model.decoder.parameters())
    assert c.params_training == sum(p.numel() for p in model.parameters())
    assert c.params_inference == c.params_training - dec


def test_training_exceeds_three_inference_forwards_for_mar():
    for variant in ("vit_b", "vit_l"):
        c = count(variant, 0.5)
        assert c.macs_training > 3 * c.macs_inference


# --------------------------------------------------------------------------- API


def test_model_flops_per_clip_any_shape():
    # The training loop's numerator: true FLOPs = 2 x MACs, at the config's own shape.
    cfg = ModelConfig(num_classes=10, arch="mar", variant="vit_tiny")
    clip = ClipConfig(img_size=112, num_frames=8)
    n, nv = 4 * 7 * 7, 196 - 98
    fwd = encoder("vit_tiny", n, nv) + bridging("vit_tiny", nv, k=10)
    assert cost.model_macs_per_clip(cfg, clip, 0.5, training=False) == fwd
    assert cost.model_flops_per_clip(cfg, clip, 0.5, training=False) == 2 * fwd
    train = cost.model_flops_per_clip(cfg, clip, 0.5, training=True)
    assert train == 2 * cost.count_model(cfg, clip, 0.5).macs_training
    # Gradient checkpointing and dropout do not change model FLOPs; nor do the pixel statistics.
    same = dataclasses.replace(cfg, grad_checkpointing=3, drop_path=0.3)
    assert cost.model_flops_per_clip(same, clip, 0.5, training=True) == train
    assert cost.model_flops_per_clip(cfg, dataclasses.replace(clip, mean=(0.5, 0.5, 0.5)), 0.5, True) == train


def test_vit_h_decoder_is_twelve_blocks():
    # VideoMAE's ViT-H pre-training decoder: 12 blocks, 640 wide, on all 1568 tokens.
    c = count("vit_h", 0.5)
    assert c.macs_decoder == decoder("vit_h", 1568, 784, spec=DecoderSpec(640, 12, 8))
    four = count("vit_h", 0.5, decoder=DecoderConfig(depth=4))
    assert c.macs_decoder - four.macs_decoder == blocks(8, 640, 1568)
    assert c.params_training - four.params_training == 8 * 4_922_880  # 8 blocks of width 640
    assert (c.macs_inference, c.params_inference) == (four.macs_inference, four.params_inference)


def test_decoder_section_sizes_the_count():
    custom = DecoderConfig(embed_dim=128, depth=3, num_heads=4)
    c = count("vit_tiny", 0.5, decoder=custom)
    assert c.macs_decoder == decoder("vit_tiny", c.tokens, c.visible_tokens, spec=DecoderSpec(128, 3, 4))
    # The variant's values written out are the same model as None: one count, one cache entry.
    table = VARIANTS["vit_tiny"].decoder
    spelled = DecoderConfig(embed_dim=table.embed_dim, depth=table.depth, num_heads=table.num_heads)
    cost._count.cache_clear()
    assert count("vit_tiny", 0.5, decoder=spelled) == count("vit_tiny", 0.5)
    assert cost._count.cache_info().currsize == 1


def test_no_decoder_means_no_decoder_flops():
    with_dec = count("vit_tiny", 0.5)
    without = count("vit_tiny", 0.5, decoder=DecoderConfig(enabled=False))
    assert without.macs_decoder == 0
    assert without.macs_inference == with_dec.macs_inference
    assert without.macs_training < with_dec.macs_training


# ----------------------------------------------------------------------- imports


def test_gpu_benchmark_imports_only_torch_and_model_modules():
    # The GPU benchmark must run where only PyTorch is installed.
    code = (
        "import sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('bench', 'benchmarks/bench_model.py')\n"
        "sys.modules['bench'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "import marscale.cost.counting, marscale.cost.table, marscale.tokens.masking, marscale.engine.loss, marscale.model\n"
        "heavy = {'deepspeed', 'webdataset', 'decord', 'timm', 'torchvision', 'av', 'yaml'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
