"""Tests for marscale.model: shapes, masking semantics against a reference written here from
primitives, position table, qkv bias layout, parameter counts, checkpointing, drop path,
timm's MLP and the weight init."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rows_of, tokens_of, tiny_clip, tiny_model_config

from marscale.core.clip import ClipConfig
from marscale.engine.loss import build_loss
from marscale.model import VARIANTS, BridgeConfig, DecoderConfig, ModelConfig, build_model
from marscale.model.layers import Attention, Block, DropPath, drop_path_rates, init_weights, sincos_table
from marscale.tokens.packing import PackedTokens

# Tokens in the tiny clips: 4 frames / tubelet 2, 32 px / patch 16 -> a 2 x 2 x 2 grid.
N = 8


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def _built(arch: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(arch, **kw), tiny_clip())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make zero-initialised biases and tokens matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def model(arch: str = "mar", seed: int = 0, **kw) -> torch.nn.Module:
    return copy.deepcopy(_built(arch, seed, **kw))


def clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


# Visible / masked token indices for two clips (4 of 8 visible, deliberately unsorted-looking sets).
VIS = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
MSK = torch.tensor([[1, 2, 4, 7], [0, 3, 5, 6]])


# --- a reference ViT written from primitives ---------------------------------------------


def ref_table(n: int, d: int) -> torch.Tensor:
    """VideoMAE's table: channel pairs (2i, 2i+1) share the angle p / 10000^(2i/d)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table.float()


def ref_attention(attn, x):
    B, n, D = x.shape
    h = attn.num_heads
    W = attn.qkv.weight
    q = x @ W[:D].T + attn.q_bias
    k = x @ W[D : 2 * D].T  # no k bias
    v = x @ W[2 * D :].T + attn.v_bias
    q, k, v = (t.view(B, n, h, D // h).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // h), dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, n, D) @ attn.proj.weight.T + attn.proj.bias


def ref_block(b, x):
    D = x.shape[-1]
    x = x + ref_attention(b.attn, F.layer_norm(x, (D,), b.norm1.weight, b.norm1.bias, 1e-6))
    y = F.layer_norm(x, (D,), b.norm2.weight, b.norm2.bias, 1e-6)
    return x + F.gelu(y @ b.mlp.fc1.weight.T + b.mlp.fc1.bias) @ b.mlp.fc2.weight.T + b.mlp.fc2.bias


def ref_tokens(enc, video):
    """Tubelet embedding + position table, all N tokens in (t, y, x) order: [B, N, D]."""
    conv = enc.patch_embed.proj
    x = F.conv3d(video, conv.weight, conv.bias, stride=conv.stride)  # [B, D, T', H', W']
    x = x.permute(0, 2, 3, 4, 1).reshape(video.shape[0], -1, x.shape[1])
    return x + ref_table(x.shape[1], x.shape[2])


def ref_encoder(enc, tokens):
    for b in enc.blocks:
        tokens = ref_block(b, tokens)
    if isinstance(enc.norm, torch.nn.LayerNorm):
        tokens = F.layer_norm(tokens, tokens.shape[-1:], enc.norm.weight, enc.norm.bias, 1e-6)
    return tokens


def gather(x, idx):
    return torch.stack([x[b, idx[b]] for b in range(x.shape[0])])


# --- shapes and masking semantics ----------------------------------------------------------


def test_output_shapes():
    m = model("mar")
    video = clip()
    m.train()
    out = m(video, tokens_of(VIS, N))
    assert out["logits"].shape == (2, 5)
    assert out["pred"].shape == (8, 1536) and "target" not in out  # the loss builds the target
    m.eval()
    assert set(m(video, tokens_of(VIS, N))) == {"logits"}
    assert m(video)["logits"].shape == (2, 5)
    vit = model("vit")
    assert set(vit(video)) == {"logits"} and vit(video)["logits"].shape == (2, 5)


def test_decoder_can_be_switched_off():
    m = build_model(tiny_model_config("mar", decoder=DecoderConfig(enabled=False)), tiny_clip()).train()
    assert m.decoder is None and set(m(clip(), tokens_of(VIS, N))) == {"logits"}


def test_decoder_size_defaults_to_the_variant_and_can_be_set():
    assert VARIANTS["vit_h"].decoder.depth == 12  # VideoMAE's ViT-H pre-training: --decoder_depth 12
    assert (VARIANTS["vit_l"].decoder.embed_dim, VARIANTS["vit_l"].decoder.depth) == (512, 12)
    h = build_model(ModelConfig(num_classes=400, variant="vit_h"), ClipConfig(), device="meta")
    assert len(h.decoder.blocks) == 12 and h.decoder.norm.normalized_shape == (640,)
    assert h.decoder.blocks[0].attn.num_heads == 8

    cfg = tiny_model_config("mar", decoder=DecoderConfig(embed_dim=64, depth=3, num_heads=2))
    assert (cfg.decoder_spec.embed_dim, cfg.decoder_spec.depth, cfg.decoder_spec.num_heads) == (64, 3, 2)
    m = build_model(cfg, tiny_clip(), device="meta")
    dec = m.decoder
    assert len(dec.blocks) == 3 and dec.blocks[0].attn.num_heads == 2
    assert dec.encoder_to_decoder.weight.shape == (64, 192) and dec.mask_token.shape == (1, 1, 64)
    assert dec.pos_embed.shape == (N, 64) and dec.head.weight.shape == (1536, 64)
    # Only the fields that are set replace the variant's.
    only_depth = tiny_model_config("mar", decoder=DecoderConfig(depth=5)).decoder_spec
    assert (only_depth.embed_dim, only_depth.depth, only_depth.num_heads) == (96, 5, 3)


def test_decoder_section_validation():
    with pytest.raises(ValueError, match="decoder.depth must be >= 1"):
        DecoderConfig(depth=0)
    with pytest.raises(ValueError, match=r"width 96 is not divisible by 5 heads.*model\.decoder\.num_heads"):
        tiny_model_config("mar", decoder=DecoderConfig(num_heads=5))
    with pytest.raises(TypeError, match=r"model\.decoder\.enabled"):
        tiny_model_config("mar", decoder=False)


@pytest.mark.parametrize("arch", ["mar", "vit"])
def test_encoder_without_mask_is_the_full_token_vit(arch):
    enc = model(arch).encoder
    video = clip()
    with torch.no_grad():
        expected = ref_encoder(enc, ref_tokens(enc, video))
        full = enc(video, PackedTokens.full(2, N)).view(2, N, -1)
        torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-5)
        all_idx = torch.arange(N).expand(2, N)
        torch.testing.assert_close(enc(video, tokens_of(all_idx, N)).view(2, N, -1), full, rtol=0, atol=0)


def test_encoder_on_visible_tokens_adds_positions_before_gathering():
    enc = model("mar").encoder
    video = clip()
    with torch.no_grad():
        full = ref_tokens(enc, video)
        expected = ref_encoder(enc, gather(full, VIS))
        got = enc(video, tokens_of(VIS, N)).view(2, 4, -1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # The wrong semantics (positions of the compacted sequence) give something else.
        conv_only = full - ref_table(N, full.shape[-1])
        wrong = ref_encoder(enc, gather(conv_only, VIS) + ref_table(4, full.shape[-1]))
        assert (got - wrong).abs().max() > 1e-3


def test_mar_logits_see_only_visible_tokens():
    m = model("mar")
    video = clip()
    with torch.no_grad():
        vis = tokens_of(VIS, N)
        expected = m.classifier(m.encoder(video, vis), vis)
        torch.testing.assert_close(m(video, vis)["logits"], expected, rtol=0, atol=0)
        # Changing the pixels of a masked tubelet (token 1 of clip 0: t=0, y=0, x=1) changes nothing.
        edited = video.clone()
        edited[0, :, 0:2, 0:16, 16:32] = 5.0
        torch.testing.assert_close(m(edited, vis)["logits"], m(video, vis)["logits"], rtol=0, atol=0)
        assert (m(edited)["logits"][0] - m(video)["logits"][0]).abs().max() > 1e-4


def test_bridging_classifier_by_hand():
    cls = model("mar").classifier
    x = torch.randn(2, 4, 192, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = x @ cls.embed.weight.T
        for b in cls.blocks:
            h = ref_block(b, h)
        pooled = F.layer_norm(h.mean(1), (64,), cls.head.fc_norm.weight, cls.head.fc_norm.bias, 1e-6)
        expected = pooled @ cls.head.head.weight.T + cls.head.head.bias
        torch.testing.assert_close(cls(*rows_of(x)), expected, rtol=1e-4, atol=1e-5)


def test_decoder_matches_in_place_reference():
    """Our decoder orders visible-then-masked; the MAR reference keeps token order with mask
    tokens in place. Attention is order-equivariant, so the predictions must agree."""
    m = model("mar")
    dec = m.decoder
    video = clip()
    with torch.no_grad():
        tokens = tokens_of(VIS, N)
        pred = dec(m.encoder(video, tokens), tokens)
        assert pred.shape == (8, 1536)  # [Mtot, P]: clip 0's masked tokens, then clip 1's
        pred = pred.view(2, 4, 1536)
        x = m.encoder(video, tokens).view(2, 4, -1)
        seq = dec.mask_token.expand(2, N, -1).clone()
        proj = x @ dec.encoder_to_decoder.weight.T
        for b in range(2):
            seq[b, VIS[b]] = proj[b]
        seq = seq + ref_table(N, seq.shape[-1])
        for blk in dec.blocks:
            seq = ref_block(blk, seq)
        out = F.layer_norm(seq, seq.shape[-1:], dec.norm.weight, dec.norm.bias, 1e-6) @ dec.head.weight.T
        expected = gather(out + dec.head.bias, MSK)
        torch.testing.assert_close(pred, expected, rtol=1e-4, atol=1e-5)


def test_reconstruction_target_by_hand():
    # The loss builds the target from the clip the model saw, with the clip section's
    # pixel statistics: a prediction equal to the by-hand target has zero loss.
    c = tiny_clip()
    loss = build_loss(c, patch_size=16, recon_weight=1.0)
    video = clip()
    mean, std = c.mean, c.std
    target = torch.zeros(2, 4, 1536)
    for b in range(2):
        for j, n in enumerate(MSK[b].tolist()):
            t, rem = divmod(n, 4)
            y, x = divmod(rem, 2)
            for ch in range(3):
                px = video[b, ch, 2 * t : 2 * t + 2, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16] * std[ch] + mean[ch]
                vals = px.double().flatten()
                mu = vals.sum() / vals.numel()
                sd = torch.sqrt(((vals - mu) ** 2).sum() / (vals.numel() - 1))
                target[b, j, ch::3] = ((vals - mu) / (sd + 1e-6)).float()
    logits = torch.zeros(2, 5)
    tokens, target = tokens_of(VIS, N), target.flatten(0, 1)  # MSK rows ascending: the layout's order
    parts = loss({"logits": logits, "pred": target}, video, tokens, torch.tensor([0, 1]))
    assert parts["loss_recon"].item() < 1e-8
    off = loss({"logits": logits, "pred": target + 0.5}, video, tokens, torch.tensor([0, 1]))
    torch.testing.assert_close(off["loss_recon"], torch.tensor(0.25), rtol=1e-5, atol=1e-6)


# --- building blocks ----------------------------------------------------------------------


def test_sincos_table_entries():
    d = 16
    table = sincos_table(10, d)
    assert table.shape == (10, d) and table.dtype == torch.float32
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * (d // 2)))
    torch.testing.assert_close(table[1, 0], torch.tensor(math.sin(1.0)))
    torch.testing.assert_close(table[1, 1], torch.tensor(math.cos(1.0)))
    torch.testing.assert_close(table[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / d))))
    torch.testing.assert_close(table[5, 7], torch.tensor(math.cos(5 / 10000 ** (6 / d))))
    torch.testing.assert_close(table[9, 15], torch.tensor(math.cos(9 / 10000 ** (14 / d))))
    torch.testing.assert_close(sincos_table(1568, 768), ref_table(1568, 768))


def test_position_tables_are_fixed_buffers_not_saved():
    m = model("mar")
    names = {n for n, _ in m.named_parameters()}
    assert not any("pos_embed" in n for n in names)
    assert not any("pos_embed" in k for k in m.state_dict())
    torch.testing.assert_close(m.encoder.pos_embed, ref_table(N, 192))
    torch.testing.assert_close(m.decoder.pos_embed, ref_table(N, 96))


def test_qkv_bias_layout():
    torch.manual_seed(0)
    layer = Attention(12, 3)
    assert layer.qkv.bias is None, "k must have no bias"
    assert {n for n, _ in layer.named_parameters()} == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}
    x = torch.randn(2, 5, 12)

    def attn(x):  # [B, N, D] through the packed layout and back
        return layer(*rows_of(x)).view(x.shape)

    with torch.no_grad():
        layer.q_bias.normal_()
        layer.v_bias.normal_()
        torch.testing.assert_close(attn(x), ref_attention(layer, x), rtol=1e-5, atol=1e-6)
        # With a zero qkv weight, q and v are their biases and k is 0: attention is uniform and
        # every token's output is proj(v_bias). A v_bias in the k slot would give proj.bias.
        layer.qkv.weight.zero_()
        torch.testing.assert_close(attn(x), layer.proj(layer.v_bias).expand(2, 5, 12), rtol=1e-5, atol=1e-6)
        # q_bias enters the logits only with k; k = 0 here, so the q bias cannot matter...
        layer.q_bias.normal_()
        torch.testing.assert_close(attn(x), layer.proj(layer.v_bias).expand(2, 5, 12), rtol=1e-5, atol=1e-6)
        # ...but with keys and values that depend on x it does.
        layer.qkv.weight[12:] = torch.randn(24, 12)
        before = attn(x)
        layer.q_bias.add_(1.0)
        assert (attn(x) - before).abs().max() > 1e-4


def test_drop_path_is_identity_in_eval_and_per_sample_in_training():
    dp = DropPath(0.5)
    rows, tokens = rows_of(torch.randn(64, 3, 4))  # 64 clips of 3 tokens
    x = rows.view(64, 3, 4)
    assert dp.eval()(rows, tokens) is rows
    torch.manual_seed(0)
    y = dp.train()(rows, tokens).view(64, 3, 4)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 0 < int(kept.sum()) < 64
    torch.testing.assert_close(y[kept], x[kept] / 0.5)


def test_drop_path_scales_kept_samples_by_exactly_one_over_keep():
    # The exact bits seeded runs depend on: x * mask / keep from one Bernoulli draw per
    # sample. (timm's x * (mask / keep) rounds 1/keep first and differs in the last bit.)
    x = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.3):
        torch.manual_seed(0)
        y = DropPath(p).train()(*rows_of(x)).view(x.shape)
        torch.manual_seed(0)
        mask = torch.empty(64, 1, 1).bernoulli_(1 - p)
        assert torch.equal(y, x * mask / (1 - p))


def test_drop_path_rates_rise_linearly_from_zero_in_double_precision():
    rates = drop_path_rates(0.1, 12)
    assert rates[0] == 0.0 and rates[-1] == 0.1 and rates[1] == 0.1 / 11
    # Not float32-rounded (as a float32 linspace would give).
    assert rates[1] != torch.tensor(0.1 / 11, dtype=torch.float32).item()
    assert drop_path_rates(0.3, 1) == [0.3]
    enc = build_model(tiny_model_config("vit", drop_path=0.3), tiny_clip(), device="meta").encoder
    assert [b.drop_path.p for b in enc.blocks[1:]] == drop_path_rates(0.3, len(enc.blocks))[1:]
    assert isinstance(enc.blocks[0].drop_path, torch.nn.Identity)  # rate 0: switched off


def test_block_mlp_equals_timm_mlp_with_videomae_keys_and_exact_numbers():
    # The model keeps its own copy so that it imports with PyTorch alone; it must stay
    # a copy: timm's Mlp with the same weights gives bit-identical outputs and gradients.
    from timm.layers import Mlp as TimmMlp

    torch.manual_seed(0)
    block = Block(16, 2, drop_path=0.2).train()
    mlp = block.mlp
    assert mlp.fc1.out_features == 64
    assert [k for k in block.state_dict() if k.startswith("mlp.")] == [
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    x = torch.randn(3, 5, 16, requires_grad=True)
    rng = torch.get_rng_state()
    y = mlp(x)
    assert torch.equal(torch.get_rng_state(), rng), "its p=0 dropouts must draw no random numbers"
    expected = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    assert torch.equal(y, expected)
    g = torch.randn_like(y)
    inputs = [x, *mlp.parameters()]
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(expected, inputs, g)):
        assert torch.equal(got, want)
    timm_mlp = TimmMlp(16, 64)
    assert timm_mlp.load_state_dict(mlp.state_dict()) is not None  # same keys, strict
    assert torch.equal(timm_mlp(x), y)


def test_init_weights_statistics():
    def build():
        torch.manual_seed(0)
        m = torch.nn.Sequential(Block(384, 6), Block(384, 6), torch.nn.Conv3d(3, 384, (2, 16, 16), stride=(2, 16, 16)))
        init_weights(m)
        return m

    m = build()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), build().state_dict().values()))
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    w = torch.cat([mod.weight.flatten() for mod in linears]).double()  # 3.5M weights
    z = w / 0.02
    assert abs(w.mean().item()) < 1e-4
    assert abs(w.std().item() / 0.02 - 1) < 5e-3
    assert abs((z**4).mean().item() - 3) < 0.05, "kurtosis of a normal"
    assert z.abs().max().item() < 6, "no far-tail (clamped) weights"
    assert all(not mod.bias.any() for mod in linears if mod.bias is not None)
    for blk in m[:2]:
        assert not blk.attn.q_bias.any() and not blk.attn.v_bias.any()
        for norm in (blk.norm1, blk.norm2):
            assert bool((norm.weight == 1).all()) and not norm.bias.any()
    conv = m[2]
    bound = math.sqrt(6 / (3 * 2 * 16 * 16 + 384))  # xavier-uniform over the flattened tubelet
    assert conv.weight.abs().max().item() <= bound and not conv.bias.any()
    assert abs(conv.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.01


def _mar(init: str, seed: int = 0, init_scale: float = 0.001, **kw):
    torch.manual_seed(seed)
    bridge = BridgeConfig(embed_dim=512, depth=2, num_heads=4, init=init)
    return build_model(
        ModelConfig(num_classes=400, variant="vit_tiny", bridge=bridge, init_scale=init_scale, **kw), tiny_clip()
    )


def test_bridge_xavier_init_is_the_mar_reference():
    """Every Linear of the bridging blocks and the final head: xavier-uniform weights, zero
    biases; unit LayerNorms; no head down-scaling; the input Linear keeps torch's default."""
    m = _mar("xavier")
    cls = m.classifier
    linears = [mod for part in (cls.blocks, cls.head) for mod in part.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block; the head
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = lin.weight.detach().double()
        assert w.abs().max().item() <= bound
        # uniform(-b, b): std b/sqrt(3), 4th moment / var^2 = 9/5; tolerance from the count
        rel = 4 / math.sqrt(w.numel())
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < rel, (lin, w.std().item())
        if w.numel() > 100_000:
            assert abs((w**4).mean().item() / w.var().item() ** 2 - 1.8) < 0.02, "kurtosis of a uniform"
        assert lin.bias is None or not lin.bias.any()
    head = cls.head.head  # 512 -> 400, not scaled by init_scale (0.001 here)
    assert abs(head.weight.std().item() / (math.sqrt(6 / 912) / math.sqrt(3)) - 1) < 0.02
    for blk in cls.blocks:
        assert not blk.attn.q_bias.any() and not blk.attn.v_bias.any()
        for norm in (blk.norm1, blk.norm2):
            assert bool((norm.weight == 1).all()) and not norm.bias.any()
    assert bool((cls.head.fc_norm.weight == 1).all()) and not cls.head.fc_norm.bias.any()
    # encoder_to_cls_decoder in the reference: torch's nn.Linear init, uniform(+-1/sqrt(fan_in)).
    w = cls.embed.weight.detach()
    assert w.shape == (512, 192) and w.abs().max().item() <= 1 / math.sqrt(192)
    assert abs(w.std().item() / (1 / math.sqrt(192) / math.sqrt(3)) - 1) < 0.02


def test_bridge_trunc_normal_init_is_the_previous_videomae_init(monkeypatch):
    """`trunc_normal` draws what one init_weights over the whole model and the head scaled by
    init_scale drew before the option existed; the encoder and decoder are the same draws
    under either option (the classifier is initialised last)."""
    from marscale.model import heads, mar

    m = _mar("trunc_normal", seed=3, init_scale=0.01)
    with monkeypatch.context() as mp:  # the constructor alone, then the previous init
        mp.setattr(mar, "init_weights", lambda module: None)
        mp.setattr(heads.BridgingClassifier, "reset_parameters", lambda self, init, scale: None)
        ref = _mar("trunc_normal", seed=3, init_scale=0.01)
    init_weights(ref)
    with torch.no_grad():
        ref.classifier.head.head.weight.mul_(0.01)
        ref.classifier.head.head.bias.mul_(0.01)
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    w = m.classifier.head.head.weight
    assert abs(w.std().item() / (0.02 * 0.01) - 1) < 0.02
    assert abs(m.classifier.blocks[0].mlp.fc1.weight.std().item() / 0.02 - 1) < 0.02
    x = _mar("xavier", seed=3)
    for name, value in m.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(value, x.state_dict()[name]), name
    with pytest.raises(ValueError, match="init='kaiming'"):
        BridgeConfig(init="kaiming")


def test_drop_path_model_is_deterministic_in_eval():
    with_dp = model("mar", drop_path=0.5, head_dropout=0.5)
    without = model("mar")
    without.load_state_dict(with_dp.state_dict())
    with_dp.eval(), without.eval()
    video = clip()
    with torch.no_grad():
        vis = tokens_of(VIS, N)
        torch.testing.assert_close(with_dp(video, vis)["logits"], without(video, vis)["logits"], rtol=0, atol=0)
        with_dp.train()
        torch.manual_seed(1)
        a = with_dp(video, vis)["logits"]
        assert (a - without(video, vis)["logits"]).abs().max() > 1e-6


def _grads(m, video, seed):
    m.zero_grad()
    torch.manual_seed(seed)
    out = m(video, tokens_of(VIS, N))
    (out["logits"].sum() + out["pred"].square().mean()).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_identical_gradients():
    # drop path on: the recomputed forward must replay the same random drops.
    base = model("mar", drop_path=0.3).train()
    ckpt = copy.deepcopy(base)
    ckpt.set_grad_checkpointing(4)
    assert ckpt.encoder.grad_checkpointing == 4
    video = clip()
    g0, g1 = _grads(base, video, 7), _grads(ckpt, video, 7)
    assert g0.keys() == g1.keys() and "encoder.blocks.0.attn.qkv.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    cfg_built = build_model(tiny_model_config("mar", grad_checkpointing=6), tiny_clip(), device="meta")
    assert cfg_built.encoder.grad_checkpointing == 6


def test_set_grad_checkpointing_validates():
    m = model("vit")
    for bad in (-1, 7):
        with pytest.raises(ValueError, match=r"\[0, 6\]"):
            m.set_grad_checkpointing(bad)
    m.set_grad_checkpointing(0)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        tiny_model_config("vit", grad_checkpointing=7)


def test_config_validation():
    for bad in (dict(arch="cnn"), dict(variant="vit_xxl"), dict(num_classes=0)):
        with pytest.raises(ValueError):
            ModelConfig(**{"num_classes": 5, **bad})
    with pytest.raises(ValueError, match="tubelet_size"):
        ClipConfig(num_frames=5)
    with pytest.raises(ValueError, match="patch size 16"):  # the clip must fit the encoder's patches
        build_model(tiny_model_config(), tiny_clip(img_size=40), device="meta")


# --- parameter counts on the meta device ----------------------------------------------------


def block_params(d: int, hidden: int) -> int:
    # norm1, qkv (no bias), q_bias, v_bias, proj, norm2, fc1, fc2
    return 2 * d + 3 * d * d + 2 * d + d * d + d + 2 * d + d * hidden + hidden + hidden * d + d


def encoder_params(variant: str, tubelet: int = 2) -> int:
    s = VARIANTS[variant].encoder
    hidden = round(s.embed_dim * s.mlp_ratio)
    embed = 3 * tubelet * s.patch_size**2 * s.embed_dim + s.embed_dim
    return embed + s.depth * block_params(s.embed_dim, hidden)


def vit_params(variant: str, k: int) -> int:
    d = VARIANTS[variant].encoder.embed_dim
    return encoder_params(variant) + 2 * d + d * k + k  # fc_norm + Linear


def mar_params(variant: str, k: int, bridge: int = 512, bridge_depth: int = 2, decoder_depth: int | None = None) -> int:
    v = VARIANTS[variant]
    d, dd = v.encoder.embed_dim, v.decoder.embed_dim
    depth = v.decoder.depth if decoder_depth is None else decoder_depth
    out = 3 * 2 * v.encoder.patch_size**2
    decoder = d * dd + dd + depth * block_params(dd, 4 * dd) + 2 * dd + dd * out + out
    classifier = d * bridge + bridge_depth * block_params(bridge, 4 * bridge) + 2 * bridge + bridge * k + k
    return encoder_params(variant) + 2 * d + decoder + classifier


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "variant,low,high",
    [("vit_b", 86.0e6, 87.0e6), ("vit_l", 303.5e6, 305.0e6), ("vit_h", 631.0e6, 633.0e6), ("vit_g", 1.00e9, 1.02e9)],
)
def test_parameter_counts_on_meta(variant, low, high):
    vit = build_model(ModelConfig(num_classes=400, arch="vit", variant=variant), ClipConfig(), device="meta")
    assert all(p.is_meta for p in vit.parameters())
    assert count(vit) == vit_params(variant, 400)
    assert low < count(vit) < high
    mar = build_model(ModelConfig(num_classes=400, arch="mar", variant=variant), ClipConfig(), device="meta")
    assert all(p.is_meta for p in mar.parameters())
    assert count(mar) == mar_params(variant, 400)


def test_vit_h_decoder_parameters():
    # 12 blocks of width 640 (VideoMAE's ViT-H pre-training decoder), 4 when set so.
    h12 = build_model(ModelConfig(num_classes=400, variant="vit_h"), ClipConfig(), device="meta")
    h4 = build_model(ModelConfig(num_classes=400, variant="vit_h", decoder=DecoderConfig(depth=4)), ClipConfig(),
                     device="meta")
    assert count(h12) == mar_params("vit_h", 400, decoder_depth=12)
    assert count(h4) == mar_params("vit_h", 400, decoder_depth=4)
    assert count(h12) - count(h4) == 8 * block_params(640, 2560) == 39_383_040


def test_vit_g_geometry():
    m = build_model(ModelConfig(num_classes=400, arch="vit", variant="vit_g"), ClipConfig(), device="meta")
    assert m.encoder.grid == (8, 16, 16) and m.encoder.num_tokens == 2048
    assert m.encoder.blocks[0].mlp.fc1.out_features == 6144


def test_decoder_gradients_are_the_same_every_run_on_a_multithreaded_cpu():
    """The mask token is read by every masked slot. Summed by advanced indexing's backward
    (atomic adds on a multi-threaded CPU) its gradient came out in another order every run
    (30 runs: 30 different gradients), so two runs of one config and seed drifted apart
    (1e-6 at step 100, 1.547 vs 1.561 at step 300 of compare-mini). Summed in index order:
    one result."""
    from marscale.model.decoder import ReconstructionDecoder
    from marscale.tokens.masking import random_mask
    from marscale.tokens.packing import pack_mask

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        B, N = 16, 256
        torch.manual_seed(0)
        dec = ReconstructionDecoder(64, 96, 1, 4, N, 24)
        packed = pack_mask(random_mask(B, (4, 8, 8), 0.75, g))  # N = 256
        visible = torch.randn(packed.total, 64, generator=g)
        upstream = torch.randn(packed.num_masked, 24, generator=g)
        grads = set()
        for _ in range(12):
            dec.zero_grad()
            (dec(visible, packed) * upstream).sum().backward()
            grads.add(tuple(dec.mask_token.grad.flatten().tolist()))
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
