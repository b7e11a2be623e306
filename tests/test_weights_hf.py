"""Tests for marscale.weights.hf and the transformers layout: VideoMAE models built and saved by
transformers itself load into marscale and compute what transformers computes.

Random-weight `VideoMAEForVideoClassification` and `VideoMAEForPreTraining` of ViT-S and
ViT-B width and heads (2 encoder and 2 decoder blocks: `SHALLOW`, registered in `VARIANTS`
for this module only) on 4-frame 32x32 clips (8 tokens), every tensor perturbed so that a
tensor loaded into the wrong place changes the outputs. The checks: every tensor lands
where the module trees (not the key names) say it belongs, the full-token logits and the
decoder's predictions for one mask equal transformers' in fp32, a mutated tensor breaks
that, config.json is checked against the model, `hf:ORG/NAME` resolves through a Hub cache
laid out here, and the README's "Start from Hugging Face" block runs as written.

LayerNorm eps: transformers runs VideoMAE with `layer_norm_eps` (1e-12 by default) in its
blocks and a hard-coded 1e-5 in fc_norm and the decoder norm; marscale uses VideoMAE's
1e-6 everywhere. `SAME_EPS` builds the transformers models with 1e-6 in every LayerNorm, so
that comparison isolates the weight mapping; the default models bound what the eps changes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import shutil
import subprocess

import pytest
import safetensors.torch
import torch
from helpers import REPO, fresh_shell_env, readme_block, shell_commands, tiny_clip

import marscale  # noqa: F401  (first: it makes torchvision importable beside CPU torch, for transformers)
from marscale.model import BridgeConfig, DecoderConfig, ModelConfig, build_model
from marscale.model.config import VARIANTS, DecoderSpec, EncoderSpec, Variant
from marscale.tokens.masking import cell_running_mask
from marscale.tokens.packing import PackedTokens, pack_mask
from marscale.weights import hf
from marscale.weights.layouts import CheckpointError, CorruptCheckpointError, read_checkpoint
from marscale.weights.pretrained import load_pretrained

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread", "shallow_variants")

# ViT-S and ViT-B widths and heads with 2 blocks (encoder and decoder): the real shapes of
# every tensor, at a depth that keeps the module fast.
SHALLOW = {
    "vit_s_2": Variant(EncoderSpec(384, 2, 6), DecoderSpec(192, 2, 3)),
    "vit_b_2": Variant(EncoderSpec(768, 2, 12), DecoderSpec(384, 2, 6)),
}
NUM_CLASSES = 7
SAME_EPS = 1e-6
"""VideoMAE's (and marscale's) LayerNorm eps."""
TOLERANCE = 1e-5
"""fp32: marscale's outputs against transformers'."""


@pytest.fixture(scope="module")
def shallow_variants():
    with pytest.MonkeyPatch.context() as mp:
        for name, variant in SHALLOW.items():
            mp.setitem(VARIANTS, name, variant)
        yield


def hf_config(variant: str, *, same_eps: bool = False, **kw):
    """transformers' config of `SHALLOW[variant]` on the tiny clip."""
    enc, dec = SHALLOW[variant].encoder, SHALLOW[variant].decoder
    fields = dict(
        image_size=32, num_frames=4, tubelet_size=2, patch_size=16,
        hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
        intermediate_size=4 * enc.embed_dim,
        decoder_hidden_size=dec.embed_dim, decoder_num_hidden_layers=dec.depth,
        decoder_num_attention_heads=dec.num_heads, decoder_intermediate_size=4 * dec.embed_dim,
        num_labels=NUM_CLASSES,
    )
    if same_eps:
        fields["layer_norm_eps"] = SAME_EPS
    fields.update(kw)
    return transformers.VideoMAEConfig(**fields)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor moved off its initialisation (zero biases, unit norms, the mask token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _built(kind: str, variant: str, same_eps: bool):
    torch.manual_seed(0)
    config = hf_config(variant, same_eps=same_eps, use_mean_pooling=kind == "classification")
    cls = {"classification": transformers.VideoMAEForVideoClassification,
           "pretraining": transformers.VideoMAEForPreTraining}[kind]
    model = perturbed(cls(config), seed=1)
    if same_eps:  # transformers fixes these two at 1e-5
        model.get_submodule("fc_norm" if kind == "classification" else "decoder.norm").eps = SAME_EPS
    return model


def hf_model(kind: str, variant: str, same_eps: bool = False):
    return copy.deepcopy(_built(kind, variant, same_eps))


def ours(variant: str, arch: str, **kw):
    cfg = ModelConfig(
        num_classes=NUM_CLASSES, arch=arch, variant=variant, drop_path=0.0, head_dropout=0.0, init_scale=1.0,
        bridge=BridgeConfig(embed_dim=64, depth=1, num_heads=4), **kw,
    )
    return build_model(cfg, tiny_clip()).eval()


def save_hf(model, folder, fmt: str = "safetensors") -> str:
    """The model as a transformers folder. `safetensors`: `save_pretrained`, which writes the
    keys of the original release (`attention.attention.q_bias` / `v_bias`); `current`: the
    modules' own names (`query.bias` / `value.bias`, `save_original_format=False`);
    `sharded`: small shards and their index; `bin`: pytorch_model.bin as transformers 4
    wrote it (`save_safetensors=False`: the state dict pickled by torch.save; transformers 5
    reads that form but no longer writes it)."""
    folder = str(folder)
    if fmt == "bin":
        model.config.save_pretrained(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
        model.save_pretrained(
            folder, max_shard_size="2MB" if fmt == "sharded" else "50GB", save_original_format=fmt != "current"
        )
    return folder


def video(seed: int = 0, batch: int = 2) -> torch.Tensor:
    """A normalised clip batch, marscale's [B, C, T, H, W] (transformers takes [B, T, C, H, W])."""
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def masked() -> torch.Tensor:
    """50% cell running masks, one drawn per clip (True = masked): 4 of the 8 tokens each."""
    return cell_running_mask(2, (2, 2, 2), 0.5, torch.Generator().manual_seed(3), train=True)


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x.transpose(1, 2)).logits


def our_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, PackedTokens.full(x.shape[0], model.encoder.num_tokens))["logits"]


def hf_predictions(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B*M, P]: each clip's masked tokens in position order."""
    with torch.no_grad():
        out = model(pixel_values=x.transpose(1, 2), bool_masked_pos=mask).logits
    return out.reshape(-1, out.shape[-1])


def our_predictions(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tokens = pack_mask(mask)
    with torch.no_grad():
        return model.decoder(model.encoder(x, tokens), tokens)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- every tensor lands ----------------------------------------------------------------------


def _block_pairs(layer, block) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """(transformers tensors, the marscale tensor they make) of one block, by module."""
    attn = layer.attention.attention
    return [
        ([layer.layernorm_before.weight], block.norm1.weight),
        ([layer.layernorm_before.bias], block.norm1.bias),
        ([attn.query.weight, attn.key.weight, attn.value.weight], block.attn.qkv.weight),
        ([attn.query.bias], block.attn.q_bias),
        ([attn.value.bias], block.attn.v_bias),
        ([layer.attention.output.dense.weight], block.attn.proj.weight),
        ([layer.attention.output.dense.bias], block.attn.proj.bias),
        ([layer.layernorm_after.weight], block.norm2.weight),
        ([layer.layernorm_after.bias], block.norm2.bias),
        ([layer.intermediate.dense.weight], block.mlp.fc1.weight),
        ([layer.intermediate.dense.bias], block.mlp.fc1.bias),
        ([layer.output.dense.weight], block.mlp.fc2.weight),
        ([layer.output.dense.bias], block.mlp.fc2.bias),
    ]


def tensor_pairs(src, dst) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Every tensor of transformers model `src` with the marscale tensor of `dst` it belongs
    to, found by walking both module trees (not through the loader's key mapping)."""
    enc = src.videomae
    pairs = [
        ([enc.embeddings.patch_embeddings.projection.weight], dst.encoder.patch_embed.proj.weight),
        ([enc.embeddings.patch_embeddings.projection.bias], dst.encoder.patch_embed.proj.bias),
    ]
    for layer, block in zip(enc.encoder.layer, dst.encoder.blocks, strict=True):
        pairs += _block_pairs(layer, block)
    if isinstance(src, transformers.VideoMAEForVideoClassification):
        pairs += [
            ([src.fc_norm.weight], dst.head.fc_norm.weight),
            ([src.fc_norm.bias], dst.head.fc_norm.bias),
            ([src.classifier.weight], dst.head.head.weight),
            ([src.classifier.bias], dst.head.head.bias),
        ]
    else:
        pairs += [
            ([enc.layernorm.weight], dst.encoder.norm.weight),
            ([enc.layernorm.bias], dst.encoder.norm.bias),
            ([src.encoder_to_decoder.weight], dst.decoder.encoder_to_decoder.weight),
            ([src.mask_token], dst.decoder.mask_token),
            ([src.decoder.norm.weight], dst.decoder.norm.weight),
            ([src.decoder.norm.bias], dst.decoder.norm.bias),
            ([src.decoder.head.weight], dst.decoder.head.weight),
            ([src.decoder.head.bias], dst.decoder.head.bias),
        ]
        for layer, block in zip(src.decoder.decoder_layers, dst.decoder.blocks, strict=True):
            pairs += _block_pairs(layer, block)
    return pairs


@pytest.mark.parametrize("variant", list(SHALLOW))
@pytest.mark.parametrize("fmt", ["safetensors", "current", "bin", "sharded"])
@pytest.mark.parametrize("kind,arch", [("classification", "vit"), ("pretraining", "mar")])
def test_every_tensor_lands(tmp_path, variant, fmt, kind, arch):
    src = hf_model(kind, variant)
    folder = save_hf(src, tmp_path, fmt)
    if fmt == "sharded":
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    q_bias = "q_bias" if fmt in ("safetensors", "sharded") else "query.bias"
    q_bias = f"videomae.encoder.layer.0.attention.attention.{q_bias}"
    assert q_bias in read_checkpoint(folder)  # both namings of the query/value biases
    # The folder is one transformers itself reads back whole.
    again = type(src).from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), again.state_dict().values(), strict=True))

    dst = ours(variant, arch)
    report = load_pretrained(dst, folder, clip=tiny_clip())
    assert report.layout == "hf_videomae" and report.unexpected == [] and report.dropped == []
    pairs = tensor_pairs(src, dst)
    covered = {id(t) for theirs, _ in pairs for t in theirs}
    assert covered == {id(p) for p in src.parameters()}  # every tensor transformers saves
    for theirs, mine in pairs:
        assert torch.equal(torch.cat(theirs) if len(theirs) > 1 else theirs[0], mine)
    loaded = {id(mine) for _, mine in pairs}
    untouched = [k for k, v in dst.state_dict(keep_vars=True).items() if id(v) not in loaded]
    assert untouched == report.missing
    # A pre-training model has no classifier: MAR's bridging classifier starts fresh.
    fresh = [] if kind == "classification" else [f"classifier.{k}" for k in dst.classifier.state_dict()]
    assert report.missing == fresh


def test_the_report_says_where_each_module_went(tmp_path):
    report = load_pretrained(ours("vit_s_2", "mar"), save_hf(hf_model("pretraining", "vit_s_2"), tmp_path))
    assert report.placed == [
        "videomae.embeddings.patch_embeddings.projection -> encoder.patch_embed.proj",
        "videomae.encoder.layer.0-1 -> encoder.blocks.0-1",
        "videomae.layernorm -> encoder.norm",
        "mask_token -> decoder.mask_token",
        "encoder_to_decoder -> decoder.encoder_to_decoder",
        "decoder.decoder_layers.0-1 -> decoder.blocks.0-1",
    ]
    text = str(report)
    assert "placed: videomae.encoder.layer.0-1 -> encoder.blocks.0-1" in text
    assert "(layout hf_videomae)" in text.splitlines()[0]
    # transformers' LayerNorm eps and the clip it was configured for are noted, not refused.
    assert any("LayerNorm eps 1e-12" in n and "VideoMAE's 1e-06" in n for n in report.notes)


# --- transformers' outputs -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(SHALLOW))
def test_full_token_logits_equal_transformers(tmp_path, variant):
    x = video()
    for same_eps in (True, False):
        src = hf_model("classification", variant, same_eps)
        dst = ours(variant, "vit")
        load_pretrained(dst, save_hf(src, tmp_path / str(same_eps)))
        expected, got = hf_logits(src, x), our_logits(dst, x)
        assert expected.abs().max() > 0.5  # logits of some size: a match is not two near-zeros
        assert max_diff(got, expected) <= TOLERANCE, (same_eps, max_diff(got, expected))
    # One tensor changed in the folder breaks the match.
    folder = save_hf(src, tmp_path / "mutated")
    state = read_checkpoint(folder)
    state["videomae.encoder.layer.1.output.dense.bias"][5] += 0.5
    safetensors.torch.save_file(state, os.path.join(folder, "model.safetensors"))
    mutated = ours(variant, "vit")
    load_pretrained(mutated, folder)
    assert max_diff(our_logits(mutated, x), expected) > 100 * TOLERANCE


@pytest.mark.parametrize("variant", list(SHALLOW))
def test_decoder_predictions_equal_transformers(tmp_path, variant):
    x, mask = video(1), masked()
    assert mask.sum(1).tolist() == [4, 4] and not torch.equal(mask[0], mask[1])
    for same_eps in (True, False):
        src = hf_model("pretraining", variant, same_eps)
        dst = ours(variant, "mar")
        load_pretrained(dst, save_hf(src, tmp_path / str(same_eps)))
        expected, got = hf_predictions(src, x, mask), our_predictions(dst, x, mask)
        assert got.shape == expected.shape == (8, 3 * 2 * 16 * 16)
        assert max_diff(got, expected) <= TOLERANCE, (same_eps, max_diff(got, expected))
    with torch.no_grad():
        dst.decoder.mask_token[0, 0, 7] += 0.5  # one value of one tensor
    assert max_diff(our_predictions(dst, x, mask), expected) > 100 * TOLERANCE


# --- config.json against the model -----------------------------------------------------------


def refusal(model, folder) -> str:
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, folder, clip=tiny_clip())
    message = str(err.value)
    assert "\n" not in message
    return message


def test_another_encoder_names_the_variant(tmp_path):
    folder = save_hf(hf_model("pretraining", "vit_s_2"), tmp_path)
    message = refusal(ours("vit_b_2", "mar"), folder)
    assert "config.json describes another model than this one" in message
    assert "its encoder has 2 blocks 384 wide, 6 heads, MLP 1536, patch 16" in message
    assert message.endswith("To fit it, set model.variant=vit_s_2.")


def test_head_counts_are_checked_from_config_json(tmp_path):
    """The weights have the same shapes for any head count: only config.json tells."""
    src = transformers.VideoMAEForPreTraining(
        hf_config("vit_s_2", decoder_num_attention_heads=6, use_mean_pooling=False)
    )
    message = refusal(ours("vit_s_2", "mar"), save_hf(src, tmp_path / "decoder"))
    assert message.endswith("To fit it, set model.decoder.num_heads=6.")
    fits = ours("vit_s_2", "mar", decoder=DecoderConfig(num_heads=6))
    assert load_pretrained(fits, save_hf(src, tmp_path / "decoder")).missing[0].startswith("classifier.")

    src = transformers.VideoMAEForVideoClassification(hf_config("vit_s_2", num_attention_heads=12))
    message = refusal(ours("vit_s_2", "vit"), save_hf(src, tmp_path / "encoder"))
    assert "To fit it, no model.variant has that encoder." in message


def test_tubelets_and_pooling_are_checked(tmp_path):
    src = transformers.VideoMAEForVideoClassification(hf_config("vit_s_2", tubelet_size=1))
    assert "set clip.tubelet_size=1" in refusal(ours("vit_s_2", "vit"), save_hf(src, tmp_path / "tubelet"))
    src = transformers.VideoMAEForVideoClassification(hf_config("vit_s_2", use_mean_pooling=False))
    message = refusal(ours("vit_s_2", "vit"), save_hf(src, tmp_path / "first_token"))
    assert "classifies from the first token" in message


def test_another_label_set_is_dropped_for_fine_tuning_and_refused_for_evaluation(tmp_path):
    folder = save_hf(hf_model("classification", "vit_s_2"), tmp_path)
    cfg = dataclasses.replace(ours("vit_s_2", "vit").cfg, num_classes=3)
    other = build_model(cfg, tiny_clip())
    report = load_pretrained(other, folder)
    assert sorted(report.dropped) == ["head.head.bias", "head.head.weight"]
    refused = r"holds a classifier for 7 classes, the model has 3: set model.num_classes=7$"
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(build_model(cfg, tiny_clip()), folder, need_classifier=True)


def test_clip_size_and_input_statistics_are_notes(tmp_path):
    src = hf_model("classification", "vit_s_2")
    src.config.image_size, src.config.num_frames = 224, 16  # what the weights were trained on
    folder = save_hf(src, tmp_path)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f)
    report = load_pretrained(ours("vit_s_2", "vit"), folder, clip=tiny_clip())
    assert report.missing == []
    assert any("clips of 16 frames of 224x224 (1568 tokens), the model's have 8" in n for n in report.notes)
    assert any("image_mean [0.5, 0.5, 0.5], the config says clip.mean" in n for n in report.notes)


def test_another_model_type_is_refused(tmp_path):
    folder = save_hf(hf_model("classification", "vit_s_2"), tmp_path)
    config = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**config, "model_type": "timesformer"}, open(os.path.join(folder, "config.json"), "w"))
    assert "describes a 'timesformer' model" in refusal(ours("vit_s_2", "vit"), folder)


# --- reading without unpickling --------------------------------------------------------------


def test_safetensors_are_read_without_unpickling(tmp_path, monkeypatch):
    folder = save_hf(hf_model("classification", "vit_s_2"), tmp_path)

    def refuse(*args, **kw):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert load_pretrained(ours("vit_s_2", "vit"), folder).missing == []


class _Payload:
    def __reduce__(self):
        return (os.makedirs, ("/nonexistent-payload-ran",))


def test_a_pickle_named_safetensors_is_refused_unopened(tmp_path):
    folder = save_hf(hf_model("classification", "vit_s_2"), tmp_path)
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        load_pretrained(ours("vit_s_2", "vit"), folder)
    assert not os.path.exists("/nonexistent-payload-ran")


def test_a_folder_without_weights_says_what_it_expected(tmp_path):
    hf_config("vit_s_2").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="has config.json but no weights: expected model.safetensors or"):
        load_pretrained(ours("vit_s_2", "vit"), str(tmp_path))


# --- hf:ORG/NAME through the local Hub cache -------------------------------------------------


def cache_model(cache, repo: str, folder: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """`folder`'s files in Hub cache `cache` as a download leaves them: content-addressed
    blobs, a snapshot of links to them, refs/main naming the snapshot."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", revision)
    os.makedirs(os.path.join(root, "blobs"))
    os.makedirs(snapshot)
    os.makedirs(os.path.join(root, "refs"))
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    # huggingface_hub reads HF_HUB_CACHE when imported: a new process sees the variable, this one the constant.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return cache


def test_hf_name_resolves_through_the_local_cache(tmp_path, hub_cache):
    src = hf_model("pretraining", "vit_s_2")
    snapshot = cache_model(hub_cache, "MCG-NJU/videomae-test", save_hf(src, tmp_path / "saved"))
    assert hf.locate("hf:MCG-NJU/videomae-test") == snapshot
    report = load_pretrained(ours("vit_s_2", "mar"), "hf:MCG-NJU/videomae-test")
    assert report.path == "hf:MCG-NJU/videomae-test" and report.layout == "hf_videomae"
    assert f"hf:MCG-NJU/videomae-test is {snapshot} in the local Hugging Face cache" in report.notes
    assert [k for k in report.missing if not k.startswith("classifier.")] == []


def test_hf_name_not_in_the_cache_says_how_to_download_it(tmp_path, hub_cache):
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours("vit_s_2", "mar"), "hf:MCG-NJU/videomae-base")
    message = str(err.value)
    assert message.startswith("hf:MCG-NJU/videomae-base is not in the local Hugging Face cache: download it once")
    assert "`hf download MCG-NJU/videomae-base`" in message and hub_cache in message
    # config.json alone (a partial download) is not enough either.
    hf_config("vit_s_2").save_pretrained(tmp_path / "config_only")
    cache_model(hub_cache, "MCG-NJU/videomae-half", str(tmp_path / "config_only"))
    with pytest.raises(CheckpointError, match="only partly in the local Hugging Face cache"):
        hf.locate("hf:MCG-NJU/videomae-half")
    with pytest.raises(CheckpointError, match="names no Hub model"):
        hf.locate("hf:videomae-base")


# --- the README, as written ------------------------------------------------------------------

TRY = os.path.join(REPO, "runs", "hf-try")


@pytest.mark.slow
def test_readme_start_from_hugging_face_runs_as_written():
    """The README's try-it block in a fresh shell: a VideoMAE saved by transformers, a MAR
    run fine-tuned from it (the encoder and decoder loaded whole, the bridging classifier
    fresh), exported as safetensors and evaluated from that folder."""
    shutil.rmtree(TRY, ignore_errors=True)
    try:
        for command in shell_commands(readme_block("hf: try")):
            proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=fresh_shell_env(), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
        report = json.load(open(os.path.join(TRY, "run", "load_report.json")))
        assert report["layout"] == "hf_videomae" and report["unexpected"] == [] and report["dropped"] == []
        groups = report["groups"]
        assert groups["encoder"]["missing"] == groups["decoder"]["missing"] == 0
        assert groups["encoder"]["loaded"] > 0 and groups["decoder"]["loaded"] > 0
        assert groups["classifier"]["loaded"] == 0 and groups["classifier"]["missing"] > 0
        assert sorted(os.listdir(os.path.join(TRY, "exported"))) == ["config.json", "model.safetensors"]
        trained = json.load(open(os.path.join(TRY, "run", "eval.json")))
        exported = json.load(open(os.path.join(TRY, "eval.json")))
        assert exported["num_videos"] == 8 and exported["top1"] == trained["top1"]
    finally:
        shutil.rmtree(TRY, ignore_errors=True)
