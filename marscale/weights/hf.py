"""Hugging Face VideoMAE models: where their folder is, and whether its config.json describes
the model being built.

transformers keeps a model as a folder: `config.json` (the architecture) beside
`model.safetensors` or `pytorch_model.bin` (`marscale.weights.layouts` reads the weights and
maps their names, layout `hf_videomae`). `model.pretrained` (and `marscale eval
--checkpoint`) take such a folder, as `save_pretrained` writes it or a Hub download leaves
it, or `hf:ORG/NAME`: the newest snapshot of that model in the local Hub cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, as huggingface_hub finds it). Nothing is downloaded:
a model that is not in the cache is an error that says how to download it.

The weights' shapes cannot tell everything: head counts are not stored, and a file of the
right shapes can still mean another computation. So config.json is checked against the
built model first (`check_config`), and a difference is one line naming the setting that
would make the model fit (`set model.variant=vit_s`, `set model.decoder.num_heads=6`,
`set clip.tubelet_size=2`) or, where no setting can, what marscale computes instead.
Differences that change no weight (the clip size, transformers' LayerNorm eps, the input
statistics of preprocessor_config.json) are notes in the load report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch.nn as nn

from marscale.core.clip import ClipConfig
from marscale.model.config import VARIANTS
from marscale.weights.layouts import MODEL_CONFIG, CheckpointError, config_file, read_config_json, weight_files

HF_SCHEME = "hf:"
"""`model.pretrained: hf:MCG-NJU/videomae-base`: a model in the local Hub cache."""
MODEL_TYPE = "videomae"
"""config.json's `model_type` for the models marscale reads."""
PREPROCESSOR_CONFIG = "preprocessor_config.json"

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# transformers' `VideoMAEConfig` defaults: a config.json leaves out the values equal to them.
_DEFAULTS = {
    "image_size": 224, "patch_size": 16, "num_channels": 3, "num_frames": 16, "tubelet_size": 2,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qv_bias": True, "use_mean_pooling": True,
    "decoder_num_attention_heads": 6, "decoder_hidden_size": 384, "decoder_num_hidden_layers": 4,
    "decoder_intermediate_size": 1536, "norm_pix_loss": True,
}
_TRANSFORMERS_HEAD_EPS = 1e-5
"""The eps of transformers' fc_norm and decoder norm (torch's LayerNorm default, not configurable)."""


def locate(name: str) -> str:
    """The path of the weights named `name`: `name` itself, or for `hf:ORG/NAME` the model's
    snapshot folder in the local Hub cache. Raises `CheckpointError` for a model that is not
    cached (whole: config.json and its weights), saying how to download it."""
    if not name.startswith(HF_SCHEME):
        return name
    repo = name[len(HF_SCHEME) :]
    if not _REPO_ID.fullmatch(repo):
        raise CheckpointError(f"{name!r} names no Hub model: write hf:ORG/NAME, e.g. hf:MCG-NJU/videomae-base")
    # Imported here: only `hf:` names need the Hub client (and it reads its cache settings on import).
    from huggingface_hub import constants, try_to_load_from_cache

    download = (
        f"download it once with `hf download {repo}` (the cache is {constants.HF_HUB_CACHE}; HF_HUB_CACHE or "
        f"HF_HOME move it), or give the path of a model folder"
    )
    config = try_to_load_from_cache(repo, MODEL_CONFIG)
    if not isinstance(config, str):
        raise CheckpointError(f"{name} is not in the local Hugging Face cache: {download}")
    folder = os.path.dirname(config)
    try:
        weight_files(folder)
    except CheckpointError:
        raise CheckpointError(
            f"{name} is only partly in the local Hugging Face cache (no weights): {download}"
        ) from None
    return folder


def read_config(path: str) -> dict | None:
    """transformers' config.json of weights `path` (a model folder, or a file in one); None
    when there is none or it is another kind of record (`marscale export`'s). A transformers
    config of another model type is a `CheckpointError`."""
    config = read_config_json(path)
    if not isinstance(config, dict) or "model_type" not in config:
        return None
    if config["model_type"] != MODEL_TYPE:
        raise CheckpointError(
            f"{config_file(path)!r} describes a {config['model_type']!r} model: marscale reads VideoMAE models "
            f"(model_type {MODEL_TYPE!r}) and the VideoMAE / MAR / marscale checkpoint files"
        )
    return config


@dataclasses.dataclass(frozen=True)
class _Encoder:
    depth: int
    width: int
    heads: int
    mlp: int
    patch: int

    def __str__(self) -> str:
        return f"{self.depth} blocks {self.width} wide, {self.heads} heads, MLP {self.mlp}, patch {self.patch}"


@dataclasses.dataclass(frozen=True)
class _Decoder:
    depth: int
    width: int
    heads: int
    mlp: int

    def __str__(self) -> str:
        return f"{self.depth} blocks {self.width} wide, {self.heads} heads, MLP {self.mlp}"


def _blocks_shape(blocks: nn.ModuleList) -> tuple[int, int, int, int]:
    """(depth, width, heads, MLP width) of a list of marscale Blocks."""
    first = blocks[0]
    return len(blocks), first.norm1.normalized_shape[0], first.attn.num_heads, first.mlp.fc1.out_features


def _variant_encoder(name: str) -> _Encoder:
    spec = VARIANTS[name].encoder
    mlp = int(round(spec.embed_dim * spec.mlp_ratio))
    return _Encoder(spec.depth, spec.embed_dim, spec.num_heads, mlp, spec.patch_size)


def _pair(value) -> tuple[int, int]:
    """config.json's image_size / patch_size: one number or [height, width]."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def check_config(
    config: dict, model: nn.Module, keys: list[str], *, source: str, clip: ClipConfig | None = None
) -> list[str]:
    """Check transformers' `config` (config.json of `source`) against `model` (a `MARModel` or
    `ViTClassifier`); `keys` are the file's key names (which parts it holds weights for).
    Returns notes for the load report; raises `CheckpointError`, one line naming each
    setting to change, when the architecture differs."""
    c = {**_DEFAULTS, **config}
    if "qv_bias" not in config and "qkv_bias" in config:  # the name in releases before 5
        c["qv_bias"] = config["qkv_bias"]
    problems, fixes, notes = [], [], []
    cfg, encoder = model.cfg, model.encoder
    patch_h, patch_w = _pair(c["patch_size"])
    theirs = _Encoder(
        c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["intermediate_size"],
        patch_h if patch_h == patch_w else c["patch_size"],
    )
    ours = _Encoder(*_blocks_shape(encoder.blocks), encoder.patch_embed.proj.kernel_size[-1])
    decoder_cfg = cfg
    if theirs != ours:
        match = [name for name in VARIANTS if _variant_encoder(name) == theirs]
        problems.append(f"its encoder has {theirs}, the model's ({cfg.variant}) {ours}")
        if match:
            fixes.append(f"set model.variant={match[0]}")
            # That variant brings its own decoder size (unless model.decoder sets one).
            decoder_cfg = dataclasses.replace(cfg, variant=match[0], grad_checkpointing=0)
        else:
            fixes.append("no model.variant has that encoder")
    tubelet = encoder.patch_embed.proj.kernel_size[0]
    if c["tubelet_size"] != tubelet:
        problems.append(f"its tubelets span {c['tubelet_size']} frames, the model's {tubelet}")
        fixes.append(f"set clip.tubelet_size={c['tubelet_size']}")
    if c["num_channels"] != 3:
        problems.append(f"it takes {c['num_channels']} input channels; marscale's clips are RGB (3)")
    if c["hidden_act"] != "gelu":
        problems.append(f"its blocks use hidden_act {c['hidden_act']!r}; marscale's use exact GELU ('gelu')")
    if not c["qv_bias"]:
        problems.append("it has no query/value biases (qv_bias false); marscale's attention always has them")

    hf_names = [k[len("videomae.") :] if k.startswith("videomae.") else k for k in keys]
    if any(k.startswith("decoder.decoder_layers.") for k in hf_names) and getattr(model, "decoder", None) is not None:
        theirs_dec = _Decoder(
            c["decoder_num_hidden_layers"], c["decoder_hidden_size"], c["decoder_num_attention_heads"],
            c["decoder_intermediate_size"],
        )
        spec = decoder_cfg.decoder_spec
        _, width, _, mlp = _blocks_shape(model.decoder.blocks)
        ours_dec = _Decoder(spec.depth, spec.embed_dim, spec.num_heads, mlp // width * spec.embed_dim)
        if theirs_dec != ours_dec:
            problems.append(f"its decoder has {theirs_dec}, the model's {ours_dec}")
            for field, value, mine in (
                ("depth", theirs_dec.depth, ours_dec.depth),
                ("embed_dim", theirs_dec.width, ours_dec.width),
                ("num_heads", theirs_dec.heads, ours_dec.heads),
            ):
                if value != mine:
                    fixes.append(f"set model.decoder.{field}={value}")
            if theirs_dec.mlp * width != mlp * theirs_dec.width:
                fixes.append(f"no decoder setting has that MLP width (marscale's is {mlp // width}x the width)")
        if not c["norm_pix_loss"]:
            notes.append(
                "config.json: the decoder was pre-trained on raw pixels (norm_pix_loss false); marscale's "
                "reconstruction loss normalises each tubelet"
            )
    if cfg.arch == "vit" and any(k.startswith("classifier.") for k in hf_names) and not c["use_mean_pooling"]:
        problems.append(
            "it classifies from the first token without fc_norm (use_mean_pooling false); marscale's full-token "
            "head mean-pools and normalises (fc_norm)"
        )
    if problems:
        fix = f" To fit it, {'; '.join(fixes)}." if fixes else ""
        raise CheckpointError(
            f"{source!r}: config.json describes another model than this one: {'; '.join(problems)}.{fix}"
        )

    (height, width), frames = _pair(c["image_size"]), c["num_frames"]
    tokens = frames // tubelet * (height // ours.patch) * (width // ours.patch)
    if tokens != encoder.num_tokens:
        notes.append(
            f"config.json: clips of {frames} frames of {height}x{width} ({tokens} tokens), the model's have "
            f"{encoder.num_tokens}; the position tables are the fixed sin-cos formula, computed for the model's clip"
        )
    ours_eps = encoder.blocks[0].norm1.eps
    if c["layer_norm_eps"] != ours_eps:
        notes.append(
            f"config.json: transformers runs these weights with LayerNorm eps {c['layer_norm_eps']:g} in its blocks "
            f"(and {_TRANSFORMERS_HEAD_EPS:g} in fc_norm and the decoder norm); marscale uses VideoMAE's "
            f"{ours_eps:g} in every LayerNorm"
        )
    notes.extend(_normalisation_notes(source, clip))
    return notes


def _normalisation_notes(path: str, clip: ClipConfig | None) -> list[str]:
    """The input statistics of preprocessor_config.json, when they differ from the clip's."""
    file = os.path.join(os.path.dirname(config_file(path)), PREPROCESSOR_CONFIG)
    if clip is None or not os.path.isfile(file):
        return []
    try:
        with open(file) as f:
            processor = json.load(f)
    except (OSError, ValueError):
        return [f"{PREPROCESSOR_CONFIG} is not readable JSON: its input statistics are not compared"]
    notes = []
    for theirs, ours in (("image_mean", "mean"), ("image_std", "std")):
        stored, expected = processor.get(theirs), list(getattr(clip, ours))
        if stored is not None and (
            len(stored) != len(expected) or any(abs(a - b) > 1e-4 for a, b in zip(stored, expected))
        ):
            notes.append(
                f"{PREPROCESSOR_CONFIG}: inputs normalised with {theirs} {stored}, the config says "
                f"clip.{ours} {expected}"
            )
    return notes
