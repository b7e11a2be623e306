"""Tests for marscale.weights.pretrained: every checkpoint layout round-trips to identical outputs.

The foreign layouts are written here from a source model, module by module, without the
loader's key mapping, so a wrong mapping cannot be undone by its own inverse.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import rows_of, tiny_clip, tiny_model_config

from marscale.weights.pretrained import CheckpointError, LoadReport, detect_layout, key_group, load_pretrained
from marscale.core.clip import ClipConfig
from marscale.tokens.masking import cell_running_mask
from marscale.tokens.packing import PackedTokens, pack_mask
from marscale.model import BridgeConfig, DecoderConfig, MARModel, ModelConfig, ViTClassifier, build_model
from marscale.model.layers import Attention, sincos_table

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("single_thread")


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every tensor (zero-initialised biases and mask tokens included) so that a
    key loaded into the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _built(arch: str, seed: int, num_classes: int, dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = MARModel if arch == "mar" else ViTClassifier
    return randomised(cls(tiny_model_config(arch, num_classes=num_classes), tiny_clip(), dtype=dtype), seed)


# Building (initialising) a model dominates these tests on a small CPU: build each once, hand out copies.
def make_mar(seed: int, num_classes: int = NUM_CLASSES) -> MARModel:
    return copy.deepcopy(_built("mar", seed, num_classes, None))


def make_vit(seed: int, num_classes: int = NUM_CLASSES, dtype=None) -> ViTClassifier:
    return copy.deepcopy(_built("vit", seed, num_classes, dtype))


def clip(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def layout(batch: int = 2) -> PackedTokens:
    # 50% cell running mask over the 2x2x2 token grid, evaluation pattern.
    return pack_mask(cell_running_mask(batch, (2, 2, 2), 0.5, train=False))


def every_token(batch: int = 2) -> PackedTokens:
    return PackedTokens.full(batch, 8)


# --- writing the foreign layouts --------------------------------------------------------


def videomae_block(b) -> dict[str, torch.Tensor]:
    return {
        "norm1.weight": b.norm1.weight,
        "norm1.bias": b.norm1.bias,
        "attn.qkv.weight": b.attn.qkv.weight,
        "attn.q_bias": b.attn.q_bias,
        "attn.v_bias": b.attn.v_bias,
        "attn.proj.weight": b.attn.proj.weight,
        "attn.proj.bias": b.attn.proj.bias,
        "norm2.weight": b.norm2.weight,
        "norm2.bias": b.norm2.bias,
        "mlp.fc1.weight": b.mlp.fc1.weight,
        "mlp.fc1.bias": b.mlp.fc1.bias,
        "mlp.fc2.weight": b.mlp.fc2.weight,
        "mlp.fc2.bias": b.mlp.fc2.bias,
    }


def mar_reference_block(b, k_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MAR reference's BaseTransformerLayer names, with a full (q, k, v) qkv bias."""
    return {
        "norm.weight": b.norm1.weight,
        "norm.bias": b.norm1.bias,
        "attn.to_qkv.weight": b.attn.qkv.weight,
        "attn.to_qkv.bias": torch.cat([b.attn.q_bias, k_bias, b.attn.v_bias]),
        "attn.proj.weight": b.attn.proj.weight,
        "attn.proj.bias": b.attn.proj.bias,
        "norm_ffn.weight": b.norm2.weight,
        "norm_ffn.bias": b.norm2.bias,
        "ffn.net.0.weight": b.mlp.fc1.weight,
        "ffn.net.0.bias": b.mlp.fc1.bias,
        "ffn.net.3.weight": b.mlp.fc2.weight,
        "ffn.net.3.bias": b.mlp.fc2.bias,
    }


def encoder_tensors(enc, prefix: str, with_norm: bool) -> dict[str, torch.Tensor]:
    out = {
        prefix + "patch_embed.proj.weight": enc.patch_embed.proj.weight,
        prefix + "patch_embed.proj.bias": enc.patch_embed.proj.bias,
    }
    for i, b in enumerate(enc.blocks):
        out.update({f"{prefix}blocks.{i}.{k}": v for k, v in videomae_block(b).items()})
    if with_norm:
        out[prefix + "norm.weight"] = enc.norm.weight
        out[prefix + "norm.bias"] = enc.norm.bias
    return out


def videomae_decoder_tensors(dec) -> dict[str, torch.Tensor]:
    out = {f"decoder.blocks.{i}.{k}": v for i, b in enumerate(dec.blocks) for k, v in videomae_block(b).items()}
    out.update(
        {
            "decoder.norm.weight": dec.norm.weight,
            "decoder.norm.bias": dec.norm.bias,
            "decoder.head.weight": dec.head.weight,
            "decoder.head.bias": dec.head.bias,
            "encoder_to_decoder.weight": dec.encoder_to_decoder.weight,
            "mask_token": dec.mask_token,
        }
    )
    return out


def videomae_pretrain_layout(src: MARModel) -> dict:
    sd = {**encoder_tensors(src.encoder, "encoder.", True), **videomae_decoder_tensors(src.decoder)}
    return {"model": detached(sd)}


def videomae_finetune_layout(src: ViTClassifier, wrapper: str = "module") -> dict:
    sd = encoder_tensors(src.encoder, "", False)
    sd.update(
        {
            "fc_norm.weight": src.head.fc_norm.weight,
            "fc_norm.bias": src.head.fc_norm.bias,
            "head.weight": src.head.head.weight,
            "head.bias": src.head.head.bias,
        }
    )
    return {wrapper: detached(sd), "epoch": 12}


def mar_reference_layout(src: MARModel, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> dict:
    g = torch.Generator().manual_seed(99)
    sd = encoder_tensors(src.encoder, "backbone.", True)
    sd.update(videomae_decoder_tensors(src.decoder))
    cls = src.classifier
    sd["encoder_to_cls_decoder.weight"] = cls.embed.weight
    for i, b in enumerate(cls.blocks):
        k_bias = torch.randn(b.attn.q_bias.shape, generator=g)  # must not change any output
        sd.update({f"cls_head.blocks.{i}.{k}": v for k, v in mar_reference_block(b, k_bias).items()})
    sd.update(
        {
            "cls_head.norm.weight": cls.head.fc_norm.weight,
            "cls_head.norm.bias": cls.head.fc_norm.bias,
            "cls_head.head.weight": cls.head.head.weight,
            "cls_head.head.bias": cls.head.head.bias,
            "cls_head.mask_token": torch.zeros(1, 1, cls.embed.out_features),
            # The reference keeps the decoder table and the input normalisation as parameters.
            "pos_embed": src.decoder.pos_embed.unsqueeze(0),
            "mean": torch.tensor(mean)[None, :, None, None, None],
            "std": torch.tensor(std)[None, :, None, None, None],
        }
    )
    # Written like the reference's save_checkpoint: weights beside optimizer state, epoch and config.
    optimizer = {"state": {}, "param_groups": []}
    return {"model_state": detached(sd), "optimizer_state": optimizer, "epoch": 40, "cfg": "yaml"}


def detached(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def save(tmp_path, obj, name: str = "ckpt.pth") -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def mar_outputs(model: MARModel, video, tokens: PackedTokens):
    with torch.no_grad():
        x = model.encoder(video, tokens)
        return {"encoded": x, "pred": model.decoder(x, tokens), "logits": model.classifier(x, tokens)}


def assert_differs(a: torch.Tensor, b: torch.Tensor):
    assert (a - b).abs().max() > 1e-3, "the fresh model already matches the source: the test would prove nothing"


# --- round trips --------------------------------------------------------------------------


def test_layout_writers_cover_every_source_tensor():
    src = make_mar(0)
    n_src = sum(p.numel() for p in src.encoder.parameters()) + sum(p.numel() for p in src.decoder.parameters())
    assert sum(v.numel() for v in videomae_pretrain_layout(src)["model"].values()) == n_src
    vit = make_vit(0)
    assert sum(v.numel() for v in videomae_finetune_layout(vit)["module"].values()) == sum(
        p.numel() for p in vit.parameters()
    )


def test_videomae_pretrain_round_trip(tmp_path, caplog):
    src, dst = make_mar(0), make_mar(1)
    video, tokens = clip(), layout()
    ref, before = mar_outputs(src, video, tokens), mar_outputs(dst, video, tokens)
    assert_differs(ref["encoded"], before["encoded"])
    classifier_before = {k: v.clone() for k, v in dst.classifier.state_dict().items()}

    ckpt = videomae_pretrain_layout(src)
    ckpt["args"] = argparse.Namespace(model="pretrain_videomae_base_patch16_224", mask_ratio=0.9)
    with caplog.at_level(logging.INFO, logger="marscale.weights.pretrained"):
        report = load_pretrained(dst, save(tmp_path, ckpt))

    assert isinstance(report, LoadReport) and report.layout == "videomae_pretrain"
    after = mar_outputs(dst, video, tokens)
    torch.testing.assert_close(after["encoded"], ref["encoded"], rtol=0, atol=0)
    torch.testing.assert_close(after["pred"], ref["pred"], rtol=0, atol=0)
    # Fine-tuning from pre-training: the bridging classifier is missing and keeps its init.
    assert report.missing == [f"classifier.{k}" for k in dst.classifier.state_dict()]
    assert report.unexpected == [] and report.dropped == []
    for k, v in dst.classifier.state_dict().items():
        torch.testing.assert_close(v, classifier_before[k], rtol=0, atol=0)
    assert "missing" in str(report) and "classifier.blocks.*." in str(report)

    # By part: encoder and decoder whole, the classifier fresh; logged as a warning (missing).
    n_enc, n_dec, n_cls = (len(getattr(dst, part).state_dict()) for part in ("encoder", "decoder", "classifier"))
    assert report.by_group() == {
        "encoder": {"loaded": n_enc, "missing": 0, "unexpected": 0, "dropped": 0},
        "decoder": {"loaded": n_dec, "missing": 0, "unexpected": 0, "dropped": 0},
        "classifier": {"loaded": 0, "missing": n_cls, "unexpected": 0, "dropped": 0},
        "other": {"loaded": 0, "missing": 0, "unexpected": 0, "dropped": 0},
    }
    (record,) = [r for r in caplog.records if r.name == "marscale.weights.pretrained"]
    assert record.levelno == logging.WARNING
    table = record.getMessage().splitlines()
    assert table[1].split() == ["loaded", "missing", "unexpected", "dropped"]
    assert table[2].split() == ["encoder", str(n_enc), "0", "0", "0"]
    assert table[3].split() == ["decoder", str(n_dec), "0", "0", "0"]
    assert table[4].split() == ["classifier", "0", str(n_cls), "0", "0"]
    as_json = json.loads(json.dumps(report.to_json()))
    assert as_json["groups"] == report.by_group() and as_json["missing"] == report.missing
    assert as_json["layout"] == "videomae_pretrain" and as_json["partial"] is False


def test_videomae_pretrain_into_vit_baseline(tmp_path):
    src, dst = make_mar(0), make_vit(1)
    report = load_pretrained(dst, save(tmp_path, videomae_pretrain_layout(src)))
    # The baseline has no final encoder norm (fc_norm replaces it) and no decoder.
    assert set(report.unexpected) == {"encoder.norm.weight", "encoder.norm.bias"} | {
        k for k in videomae_pretrain_layout(src)["model"] if not k.startswith("encoder.")
    }
    assert report.missing == ["head.fc_norm.weight", "head.fc_norm.bias", "head.head.weight", "head.head.bias"]
    x = src.encoder.embed(clip(), every_token())
    with torch.no_grad():
        for b in src.encoder.blocks:
            x = b(x, every_token())
        torch.testing.assert_close(dst.encoder(clip(), every_token()), x, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["module", "model"])
def test_videomae_finetune_round_trip(tmp_path, wrapper):
    src, dst = make_vit(0), make_vit(1)
    video = clip()
    with torch.no_grad():
        ref, before = src(video)["logits"], dst(video)["logits"]
    assert_differs(ref, before)
    report = load_pretrained(dst, save(tmp_path, videomae_finetune_layout(src, wrapper)))
    assert report.layout == "videomae_finetune"
    assert report.missing == [] and report.unexpected == [] and report.dropped == []
    with torch.no_grad():
        torch.testing.assert_close(dst(video)["logits"], ref, rtol=0, atol=0)


def test_mar_reference_round_trip(tmp_path):
    src, dst = make_mar(0), make_mar(1)
    video, tokens = clip(), layout()
    ref, before = mar_outputs(src, video, tokens), mar_outputs(dst, video, tokens)
    assert_differs(ref["logits"], before["logits"])
    report = load_pretrained(dst, save(tmp_path, mar_reference_layout(src)))
    assert report.layout == "mar_reference"
    assert report.missing == [] and report.unexpected == [] and report.dropped == []
    assert sorted(report.ignored) == ["cls_head.mask_token", "mean", "pos_embed", "std"]
    assert report.notes == []
    after = mar_outputs(dst, video, tokens)
    for k in ref:
        # The dropped k bias changes attention logits by a per-query constant: equal up to rounding.
        torch.testing.assert_close(after[k], ref[k], rtol=1e-5, atol=1e-6)


def test_mar_reference_normalisation_mismatch_is_noted(tmp_path):
    path = save(tmp_path, mar_reference_layout(make_mar(0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    report = load_pretrained(make_mar(1), path, clip=tiny_clip())
    assert len(report.notes) == 2 and "clip.mean" in report.notes[0] and "clip.std" in report.notes[1]
    assert load_pretrained(make_mar(1), path).notes == []  # without a clip to compare with


def test_k_bias_leaves_attention_unchanged():
    """Why the MAR reference's k bias may be dropped: softmax cancels a per-query constant."""
    torch.manual_seed(0)
    attn = randomised(Attention(16, 4), 3)
    k_bias = torch.randn(16)
    x = torch.randn(2, 5, 16)
    B, N, D = x.shape
    qkv = F.linear(x, attn.qkv.weight, torch.cat([attn.q_bias, k_bias, attn.v_bias]))
    q, k, v = qkv.view(B, N, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
    with torch.no_grad():
        torch.testing.assert_close(attn(*rows_of(x)).view(B, N, D), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("container", ["plain", "ddp", "compiled", "ddp_compiled", "compiled_encoder", "export"])
def test_marscale_layout_round_trip(tmp_path, caplog, container):
    src, dst = make_mar(0), make_mar(1)
    video, tokens = clip(), layout()
    ref = mar_outputs(src, video, tokens)
    sd = src.state_dict()
    if container == "ddp":
        sd = {"module." + k: v for k, v in sd.items()}
    if container == "compiled":  # torch.compile(model).state_dict()
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    if container == "ddp_compiled":  # DDP around a compiled model
        sd = {"module._orig_mod." + k: v for k, v in sd.items()}
    if container == "compiled_encoder":  # model.encoder = torch.compile(model.encoder)
        sd = {k.replace("encoder.", "encoder._orig_mod.", 1) if k.startswith("encoder.") else k: v
              for k, v in sd.items()}
    if container == "export":  # what `marscale export` writes
        sd = {"model": sd, "config": {"model": {"variant": "vit_tiny", "num_classes": NUM_CLASSES}}, "step": 100}
    path = save(tmp_path, sd)
    with caplog.at_level(logging.INFO, logger="marscale.weights.pretrained"):
        report = load_pretrained(dst, path)
    assert report.layout == "marscale" and report.missing == [] and report.unexpected == []
    assert [r.levelno for r in caplog.records if r.name == "marscale.weights.pretrained"] == [logging.INFO]  # all loaded
    after = mar_outputs(dst, video, tokens)
    for k in ref:
        torch.testing.assert_close(after[k], ref[k], rtol=0, atol=0)


def test_detect_layout_names():
    assert detect_layout({"encoder.blocks.0.norm1.weight": torch.zeros(1)}) == "videomae_pretrain"
    assert detect_layout({"blocks.0.norm1.weight": torch.zeros(1), "patch_embed.proj.weight": torch.zeros(1)}) == (
        "videomae_finetune"
    )
    assert detect_layout({"backbone.norm.weight": torch.zeros(1)}) == "mar_reference"
    assert detect_layout({"encoder.norm.weight": torch.zeros(1), "head.head.bias": torch.zeros(1)}) == "marscale"
    assert detect_layout({"fc.weight": torch.zeros(1)}) is None


# --- decoders of other sizes, prefixes ------------------------------------------------------


def zero_strided(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of the same shapes that store one element each (stride 0): a ViT-H-shaped
    checkpoint of a few kilobytes."""
    return {k: torch.zeros(()).expand(v.shape) for k, v in sd.items()}


def vit_h(**decoder) -> MARModel:
    cfg = ModelConfig(num_classes=400, variant="vit_h", decoder=DecoderConfig(**decoder))
    return build_model(cfg, ClipConfig(), device="meta")


# Loading into a meta model checks names and shapes; copying values into it is a no-op.
meta_copy = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")


@meta_copy
def test_videomae_vit_h_pretraining_loads_whole_into_mar_vit_h(tmp_path):
    """VideoMAE's ViT-H pre-training decoder has 12 blocks (640 wide, 8 heads): MAR ViT-H
    builds the same, so encoder and decoder load whole."""
    src = vit_h()
    assert len(src.decoder.blocks) == 12
    sd = {**encoder_tensors(src.encoder, "encoder.", True), **videomae_decoder_tensors(src.decoder)}
    assert sum(1 for k in sd if k.startswith("decoder.blocks.")) == 12 * 13
    path = save(tmp_path, {"model": zero_strided(sd)}, "videomae_vit_h_pretrain.pth")
    assert os.path.getsize(path) < 2_000_000

    report = load_pretrained(vit_h(), path)
    assert report.unexpected == [] and report.dropped == [] and report.ignored == []
    assert report.missing == [k for k in src.state_dict() if k.startswith("classifier.")]
    groups = report.by_group()
    assert groups["encoder"]["loaded"] == len(src.encoder.state_dict()) == 2 + 32 * 13 + 2
    assert groups["decoder"]["loaded"] == len(src.decoder.state_dict()) == 12 * 13 + 6
    assert groups["decoder"]["missing"] == groups["decoder"]["unexpected"] == 0

    # The 4-block decoder (the table's value before) refuses it and says what to set.
    before = vit_h(depth=4)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(before, path)
    message = str(err.value)
    assert "set model.decoder.depth=12 (the checkpoint's decoder has 12 blocks, the model's 4)" in message
    assert "104 weights have no place in the model's modules: decoder.blocks.4-11.*" in message
    assert "model.pretrained_partial: true" in message and path in message
    # Asked for, a partial load takes blocks 0-3 and reports 4-11 as unexpected.
    report = load_pretrained(before, path, partial=True)
    assert len(report.unexpected) == 104 and all(k.startswith("decoder.blocks.") for k in report.unexpected)
    assert report.by_group()["decoder"] == {"loaded": 4 * 13 + 6, "missing": 0, "unexpected": 104, "dropped": 0}
    assert any("decoder.blocks.4-11.*" in n for n in report.notes)


@meta_copy
def test_encoder_of_another_size_names_the_variant(tmp_path):
    """A VideoMAE ViT-L pre-training checkpoint given to MAR ViT-H: the fix is the variant,
    whose decoder (12 x 512) then fits too, so no decoder setting is named."""
    src = build_model(ModelConfig(num_classes=400, variant="vit_l"), ClipConfig(), device="meta")
    sd = {**encoder_tensors(src.encoder, "encoder.", True), **videomae_decoder_tensors(src.decoder)}
    path = save(tmp_path, {"model": zero_strided(sd)})
    with pytest.raises(CheckpointError) as err:
        load_pretrained(vit_h(), path)
    message = str(err.value)
    assert "it lacks 104 weights of the model: encoder.blocks.24-31.*" in message
    assert ("To fit it, set model.variant=vit_l (the checkpoint's encoder has 24 blocks 1024 wide, the model's "
            "32 blocks 1280 wide). To load only") in message


def test_custom_decoder_round_trip(tmp_path):
    """model.decoder sizes a decoder that VideoMAE pre-trained otherwise; it loads whole
    and predicts as the source does."""
    custom = DecoderConfig(embed_dim=64, depth=3, num_heads=4)
    torch.manual_seed(0)
    src = randomised(MARModel(tiny_model_config(num_classes=NUM_CLASSES, decoder=custom), tiny_clip()), 0)
    torch.manual_seed(1)
    dst = randomised(MARModel(tiny_model_config(num_classes=NUM_CLASSES, decoder=custom), tiny_clip()), 1)
    video, tokens = clip(), layout()
    ref = mar_outputs(src, video, tokens)
    report = load_pretrained(dst, save(tmp_path, videomae_pretrain_layout(src)))
    assert report.unexpected == [] and report.dropped == [] and report.by_group()["decoder"]["missing"] == 0
    torch.testing.assert_close(mar_outputs(dst, video, tokens)["pred"], ref["pred"], rtol=0, atol=0)


def test_decoder_of_another_width_names_the_settings(tmp_path):
    torch.manual_seed(0)
    src = MARModel(tiny_model_config(num_classes=NUM_CLASSES, decoder=DecoderConfig(embed_dim=64, num_heads=4)),
                   tiny_clip())
    path = save(tmp_path, videomae_pretrain_layout(src))
    dst = make_mar(1)  # vit_tiny's decoder: 96 wide
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, path)
    message = str(err.value)
    assert "set model.decoder.embed_dim=64 and model.decoder.num_heads to the checkpoint's" in message
    assert "(its decoder is 64 wide, the model's 96; head counts are not stored)" in message
    assert "31 weights have another shape: decoder.blocks.0.norm1.weight (64,) vs the model's (96,)" in message
    for k, v in dst.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    report = load_pretrained(dst, path, partial=True)
    # Only the output bias (1536 pixel values) has the same shape in both widths.
    assert report.by_group()["decoder"]["loaded"] == 1 and report.loaded[-1] == "decoder.head.bias"
    assert report.by_group()["decoder"]["dropped"] == len(dst.decoder.state_dict()) - 1
    torch.testing.assert_close(dst.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)


def test_decoder_shallower_than_the_model_names_the_depth(tmp_path):
    torch.manual_seed(0)
    src = MARModel(tiny_model_config(num_classes=NUM_CLASSES, decoder=DecoderConfig(depth=1)), tiny_clip())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(make_mar(1), save(tmp_path, videomae_pretrain_layout(src)))
    assert "it lacks 13 weights of the model: decoder.blocks.1.*" in str(err.value)
    assert "set model.decoder.depth=1 (the checkpoint's decoder has 1 block, the model's 2)" in str(err.value)


def test_bridge_depth_mismatch_names_the_setting(tmp_path):
    path = save(tmp_path, mar_reference_layout(make_mar(0)))
    torch.manual_seed(0)
    dst = MARModel(tiny_model_config(num_classes=NUM_CLASSES, bridge=BridgeConfig(embed_dim=64, depth=1, num_heads=4)),
                   tiny_clip())
    with pytest.raises(CheckpointError, match=r"set model\.bridge\.depth=2 \(the checkpoint's classifier has 2"):
        load_pretrained(dst, path)


def test_weights_of_modules_the_model_lacks_are_unexpected_not_errors(tmp_path):
    # A switched-off decoder: the pre-training decoder has no module to go to.
    torch.manual_seed(0)
    no_decoder = MARModel(tiny_model_config(num_classes=NUM_CLASSES, decoder=DecoderConfig(enabled=False)),
                          tiny_clip())
    src = make_mar(0)
    report = load_pretrained(no_decoder, save(tmp_path, videomae_pretrain_layout(src)))
    n_decoder = len(videomae_decoder_tensors(src.decoder))
    assert report.by_group()["decoder"] == {"loaded": 0, "missing": 0, "unexpected": n_decoder, "dropped": 0}
    torch.testing.assert_close(no_decoder.encoder.norm.weight, src.encoder.norm.weight, rtol=0, atol=0)
    # The full-token baseline has no final encoder norm (nn.Identity): unexpected, not a misfit.
    report = load_pretrained(make_vit(1), save(tmp_path, videomae_pretrain_layout(src), "b.pth"))
    assert {"encoder.norm.weight", "encoder.norm.bias"} <= set(report.unexpected)
    # But a tensor the encoder's modules do not have is a misfit.
    ckpt = videomae_pretrain_layout(src)
    ckpt["model"]["encoder.blocks.0.attn.k_bias"] = torch.zeros(192)
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.0\.attn\.k_bias"):
        load_pretrained(make_mar(1), save(tmp_path, ckpt, "c.pth"))


def test_backbone_prefix_loads_the_encoder(tmp_path):
    """Encoder weights under `backbone.` (the MAR reference's name for it), alone."""
    src, dst = make_mar(0), make_mar(1)
    sd = encoder_tensors(src.encoder, "backbone.", True)
    report = load_pretrained(dst, save(tmp_path, {"state_dict": detached(sd)}))
    assert report.layout == "mar_reference" and report.unexpected == []
    assert report.by_group()["encoder"] == {"loaded": len(sd), "missing": 0, "unexpected": 0, "dropped": 0}
    with torch.no_grad():
        torch.testing.assert_close(dst.encoder(clip(), every_token()), src.encoder(clip(), every_token()), rtol=0, atol=0)


def test_key_groups_of_every_layout():
    for key in ("encoder.blocks.0.norm1.weight", "backbone.norm.bias", "blocks.3.mlp.fc1.weight", "norm.weight",
                "patch_embed.proj.weight"):
        assert key_group(key) == "encoder", key
    for key in ("decoder.blocks.0.norm1.weight", "decoder.mask_token", "encoder_to_decoder.weight", "mask_token"):
        assert key_group(key) == "decoder", key
    for key in ("classifier.embed.weight", "head.head.bias", "fc_norm.weight", "head.weight",
                "cls_head.blocks.0.norm.weight", "encoder_to_cls_decoder.weight"):
        assert key_group(key) == "classifier", key
    assert key_group("mean") == key_group("step_counter") == "other"


# --- heads, missing and mismatched weights, dtypes ----------------------------------------


def test_head_of_other_shape_is_dropped_and_reported(tmp_path):
    src = make_vit(0, num_classes=NUM_CLASSES)
    dst = make_vit(1, num_classes=7)
    head_before = dst.head.head.weight.clone()
    report = load_pretrained(dst, save(tmp_path, videomae_finetune_layout(src)))
    assert report.dropped == ["head.head.weight", "head.head.bias"]
    assert report.missing == ["head.head.weight", "head.head.bias"]
    assert any("(10, 192)" in n and "(7, 192)" in n for n in report.notes)
    torch.testing.assert_close(dst.head.head.weight, head_before, rtol=0, atol=0)
    torch.testing.assert_close(dst.head.fc_norm.weight, src.head.fc_norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(dst.encoder.blocks[3].mlp.fc2.weight, src.encoder.blocks[3].mlp.fc2.weight)
    assert "dropped (2)" in str(report)


def test_bridging_head_of_other_shape_is_dropped(tmp_path):
    report = load_pretrained(make_mar(1, num_classes=7), save(tmp_path, mar_reference_layout(make_mar(0))))
    assert report.dropped == ["classifier.head.head.weight", "classifier.head.head.bias"]


def test_missing_encoder_weights_raise_unless_partial(tmp_path):
    src = make_vit(0)
    ckpt = videomae_finetune_layout(src)
    del ckpt["module"]["blocks.1.mlp.fc1.weight"]
    path = save(tmp_path, ckpt)
    dst = make_vit(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.1\.mlp\.fc1\.weight") as err:
        load_pretrained(dst, path)
    assert isinstance(err.value, ValueError) and path in str(err.value)
    for k, v in dst.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)

    report = load_pretrained(dst, path, partial=True)
    assert report.missing_encoder == ["encoder.blocks.1.mlp.fc1.weight"]
    torch.testing.assert_close(dst.encoder.blocks[1].mlp.fc1.weight, before["encoder.blocks.1.mlp.fc1.weight"])
    torch.testing.assert_close(dst.encoder.blocks[1].mlp.fc2.weight, src.encoder.blocks[1].mlp.fc2.weight)


def test_encoder_shape_mismatch_names_key_and_shapes(tmp_path):
    src = make_vit(0)
    ckpt = videomae_finetune_layout(src)
    ckpt["module"]["blocks.0.attn.qkv.weight"] = torch.zeros(10, 192)
    path = save(tmp_path, ckpt)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight \(10, 192\) vs the model's "
                       r"encoder\.blocks\.0\.attn\.qkv\.weight \(576, 192\)") as err:
        load_pretrained(make_vit(1), path)
    assert "model.pretrained_partial: true" in str(err.value)
    # A partial load leaves it out and says so.
    dst = make_vit(1)
    before = dst.encoder.blocks[0].attn.qkv.weight.clone()
    report = load_pretrained(dst, path, partial=True)
    assert report.dropped == ["encoder.blocks.0.attn.qkv.weight"] == report.missing
    assert any("another shape" in n for n in report.notes)
    torch.testing.assert_close(dst.encoder.blocks[0].attn.qkv.weight, before, rtol=0, atol=0)
    torch.testing.assert_close(dst.encoder.blocks[0].attn.proj.weight, src.encoder.blocks[0].attn.proj.weight)


def test_position_tables(tmp_path):
    """A stored table equal to the fixed sin-cos one is skipped; one for another clip size
    too, with a note; learned positions are an error (partial: skipped with a note)."""
    src = make_vit(0)
    video = clip()
    with torch.no_grad():
        ref = src(video)["logits"]
    ckpt = videomae_finetune_layout(src)

    ckpt["module"]["pos_embed"] = src.encoder.pos_embed.unsqueeze(0).clone()  # the same fixed table
    dst = make_vit(2)
    report = load_pretrained(dst, save(tmp_path, ckpt, "same.pth"))
    assert report.ignored == ["pos_embed"] and report.notes == []
    with torch.no_grad():
        torch.testing.assert_close(dst(video)["logits"], ref, rtol=0, atol=0)

    ckpt["module"]["pos_embed"] = src.encoder.pos_embed.unsqueeze(0).to(torch.bfloat16)  # rounded: still it
    assert load_pretrained(make_vit(2), save(tmp_path, ckpt, "bf16.pth")).notes == []

    ckpt["module"]["pos_embed"] = sincos_table(16 * 14 * 14, 192).unsqueeze(0)  # fixed, for 16x224x224 clips
    report = load_pretrained(make_vit(1), save(tmp_path, ckpt, "other_size.pth"))
    assert report.ignored == ["pos_embed"] and "3136 positions" in report.notes[0] and "has 8" in report.notes[0]

    noise = torch.randn(1, 8, 192, generator=torch.Generator().manual_seed(0))
    learned = src.encoder.pos_embed.unsqueeze(0) + 0.01 * noise
    ckpt["module"]["pos_embed"] = learned
    path = save(tmp_path, ckpt, "learned.pth")
    dst = make_vit(3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"pos_embed \(1, 8, 192\) is not the fixed sin-cos table"):
        load_pretrained(dst, path)
    for k, v in dst.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    ckpt["module"]["pos_embed"] = torch.randn(1, 3136, 192)  # learned, for another clip size
    with pytest.raises(CheckpointError, match="not the fixed sin-cos table"):
        load_pretrained(make_vit(3), save(tmp_path, ckpt, "learned_other_size.pth"))
    report = load_pretrained(dst, path, partial=True)
    assert report.ignored == ["pos_embed"] and any("not the fixed sin-cos table" in n for n in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(dst(video)["logits"], ref, rtol=0, atol=0)


def test_mar_reference_learned_decoder_table_is_an_error(tmp_path):
    ckpt = mar_reference_layout(make_mar(0))
    ckpt["model_state"]["pos_embed"] = ckpt["model_state"]["pos_embed"] * 1.5
    with pytest.raises(CheckpointError, match=r"position table pos_embed \(1, 8, 96\) is not the fixed"):
        load_pretrained(make_mar(1), save(tmp_path, ckpt))


def test_dtypes_are_converted_to_the_model(tmp_path):
    src = make_vit(0)
    ckpt = videomae_finetune_layout(src)
    ckpt["module"] = {k: v.to(torch.bfloat16) for k, v in ckpt["module"].items()}
    dst = make_vit(1)
    load_pretrained(dst, save(tmp_path, ckpt, "bf16.pth"))
    assert all(p.dtype == torch.float32 for p in dst.parameters())
    w = dst.encoder.blocks[2].attn.qkv.weight
    torch.testing.assert_close(w, src.encoder.blocks[2].attn.qkv.weight.to(torch.bfloat16).float(), rtol=0, atol=0)

    dst16 = make_vit(1, dtype=torch.bfloat16)
    load_pretrained(dst16, save(tmp_path, videomae_finetune_layout(src), "fp32.pth"))
    assert all(p.dtype == torch.bfloat16 for p in dst16.parameters())
    torch.testing.assert_close(dst16.head.head.weight, src.head.head.weight.to(torch.bfloat16), rtol=0, atol=0)


# --- files that are not checkpoints -------------------------------------------------------


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_missing_file_and_directory(tmp_path):
    for path in (str(tmp_path / "nope.pth"), str(tmp_path)):
        with pytest.raises(CheckpointError, match="does not exist") as err:
            load_pretrained(make_vit(0), path)
        assert path in str(err.value)


@pytest.mark.parametrize(
    "name,data",
    [
        ("notes.txt", b"this is a text file, not weights\n" * 20),
        ("random.bin", bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())),
        ("empty.pth", b""),
    ],
)
def test_not_a_checkpoint(tmp_path, name, data):
    path = _write(tmp_path, name, data)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(make_vit(0), path)
    assert path in str(err.value)


def test_truncated_checkpoint(tmp_path):
    full = save(tmp_path, videomae_finetune_layout(make_vit(0)), "full.pth")
    with open(full, "rb") as f:
        data = f.read()
    path = _write(tmp_path, "truncated.pth", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_pretrained(make_vit(1), path)
    assert path in str(err.value)


def test_checkpoint_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_pretrained(make_vit(0), save(tmp_path, torch.zeros(3), "tensor.pth"))
    with pytest.raises(CheckpointError, match="no state dict"):
        load_pretrained(make_vit(0), save(tmp_path, {"epoch": 3}, "meta.pth"))
    with pytest.raises(CheckpointError, match="no known layout"):
        load_pretrained(make_vit(0), save(tmp_path, {"fc.weight": torch.zeros(2, 2)}, "other.pth"))


SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECTS.append(tag)
    return tag


class _Payload:
    """Unpickling this runs a function: what weights_only=True exists to refuse."""

    def __reduce__(self):
        return (_record_side_effect, ("payload ran",))


def test_arbitrary_objects_are_refused(tmp_path):
    ckpt = videomae_finetune_layout(make_vit(0))
    ckpt["extra"] = _Payload()
    path = save(tmp_path, ckpt, "payload.pth")
    SIDE_EFFECTS.clear()
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        load_pretrained(make_vit(1), path)
    assert path in str(err.value) and "_record_side_effect" in str(err.value)  # names the refused global
    assert SIDE_EFFECTS == []
    assert os.path.exists(path)
