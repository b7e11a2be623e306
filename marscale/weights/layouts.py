"""Reading a checkpoint file safely, and the key names of each layout users bring.

`load_file` is the one way marscale unpickles a checkpoint file: `torch.load(weights_only=True)`,
so a file from the internet (or a planted one) can run no code here, with an explicit
allow-list of the few classes a kind of file legitimately holds: `argparse.Namespace` for
the files users bring (VideoMAE and MAE store their command line in every checkpoint), a
handful of DeepSpeed's own classes for DeepSpeed's files (`DEEPSPEED_GLOBALS`). Anything
else is an `UnsafeCheckpointError`; a truncated or foreign file a `CorruptCheckpointError`.

safetensors files (`.safetensors`) hold tensors and a JSON header only: `read_safetensors`
reads them without any unpickling. A model folder, as transformers' `save_pretrained`
writes it, a Hub download leaves it or `marscale export` writes it, is `config.json` beside
`model.safetensors` or `pytorch_model.bin`, each possibly sharded (`NAME.index.json` lists
the shards); `read_checkpoint` reads a file or such a folder.

`read_checkpoint` unwraps the state dict and strips wrapper prefixes. `detect_layout`
names the layout from the keys, and `MAPPINGS[layout]` maps each key onto marscale's
parameter names (see `marscale.weights.pretrained` for the layouts and what loading checks).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import pickle
import re
from typing import Any, Iterator, Sequence

import safetensors
import safetensors.torch
import torch

LAYOUTS = ("videomae_pretrain", "videomae_finetune", "hf_videomae", "mar_reference", "marscale")

SAFETENSORS_SUFFIX = ".safetensors"
MODEL_CONFIG = "config.json"
"""The file that makes a folder a model folder (transformers' or `marscale export`'s)."""
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
"""A model folder's weights, looked for in this order (safetensors first: nothing to
unpickle); each may be sharded, its shards listed in `NAME.index.json`."""

# Keys that may hold the state dict inside a checkpoint file, most specific first.
_WRAPPER_KEYS = ("model_state", "module", "model", "state_dict")
# Added in front of every key by a wrapper: DDP / DeepSpeed (`module.`), torch.compile
# (`_orig_mod.`, also in front of a compiled submodule's keys).
_WRAPPER_PREFIX = "module."
_COMPILE_PREFIX = re.compile(r"(^|\.)_orig_mod\.")

USER_GLOBALS = (argparse.Namespace,)
"""Allowed in the checkpoint files users bring: VideoMAE and MAE store their command line."""

DEEPSPEED_GLOBALS = (
    # ZeRO 1-3 optimizer states (`loss_scaler`): the static scaler under bf16/fp32, the
    # dynamic one under fp16.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    # ZeRO 1-3 optimizer states (`zero_stage`).
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # ZeRO 1-2 optimizer states (`param_slice_mappings`).
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The classes DeepSpeed stores in its checkpoint files besides tensors and plain
containers (found with `torch.serialization.get_unsafe_globals_in_checkpoint` on every
ZeRO stage x precision; the model states files need none). Unpickling them only sets
attributes or looks up an enum member: no code of the file's choosing runs."""

_TRUST_HINT = (
    "If you trust the file, extract its weights once: torch.save(torch.load(path, weights_only=False)[KEY], "
    "'weights.pt'), KEY being the entry that holds the state dict."
)

IGNORE = "<ignored>"
"""Mapping target of a key the layout is known to hold and loading skips."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model. The message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds Python objects outside the allow-list: unpickling it could run
    code, so it is refused."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupt or not a PyTorch file (or differs from the size
    and sha256 its checkpoint's COMPLETE marker recorded)."""


@functools.lru_cache(maxsize=None)
def deepspeed_globals() -> tuple:
    """`DEEPSPEED_GLOBALS` as objects, for `load_file(allow=...)`. Imports DeepSpeed; a name
    the installed version lacks is left out (its files cannot hold it)."""
    found = []
    for dotted in DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextlib.contextmanager
def allowing(globals_: Sequence[Any]):
    """`globals_` allowed for weights_only loads inside the block."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5 has only the process-wide allow-list
        torch.serialization.add_safe_globals(list(globals_))
        yield
        return
    with safe_globals(list(globals_)):
        yield


def load_file(
    path: str, *, allow: Sequence[Any] = USER_GLOBALS, mmap: bool = False, hint: str = _TRUST_HINT
) -> Any:
    """The object stored in checkpoint file `path`, unpickled with `weights_only=True` and
    `allow` as the only classes beyond tensors and plain containers.

    mmap: map the tensors' storage instead of reading it (only the pickle is read: a cheap
    way to check a large file); files in torch's pre-1.6 format are read whole.

    Raises `UnsafeCheckpointError` (naming the refused global; `hint` says what to do),
    `CorruptCheckpointError` for anything torch cannot read, and `CheckpointError` when
    `path` is no file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (or is not a file)")
    if mmap:
        with open(path, "rb") as f:
            mmap = f.read(4) == b"PK\x03\x04"  # torch maps only its zip format
    try:
        with allowing(allow):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            reason = refused_global(e)
            raise UnsafeCheckpointError(
                f"checkpoint {path!r} holds Python objects other than tensors and plain containers, so it "
                f"is refused (read with weights_only=True). {reason} {hint}".rstrip()
            ) from e
        raise CorruptCheckpointError(f"{path!r} is not a PyTorch checkpoint ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # A truncated zip, random bytes or an empty file surface as any of these.
        raise CorruptCheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def refused_global(error: pickle.UnpicklingError) -> str:
    """"Unsupported global: GLOBAL module.name" from torch's weights_only error ("" if absent)."""
    found = re.search(r"Unsupported global: GLOBAL \S+", str(error))
    return f"{found.group(0)}." if found else ""


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`. The format is a JSON header and raw tensor
    bytes: reading it runs no code, whatever the file holds. Raises `CorruptCheckpointError`
    for a file that is no safetensors file (a pickle renamed, truncated bytes)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (or is not a file)")
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable safetensors file (truncated, corrupt or another format?): {e}"
        ) from e


def config_file(path: str) -> str:
    """Where the config.json of weights `path` (a model folder, or a file in one) would be."""
    return os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), MODEL_CONFIG)


def read_config_json(path: str):
    """The parsed config.json beside weights `path` (`config_file`), or None when there is
    none; unreadable JSON is a `CheckpointError` naming the file."""
    file = config_file(path)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file!r} is not readable JSON: {e}") from e


def is_model_folder(path: str) -> bool:
    """Whether `path` is a folder holding a `config.json` (transformers' or `marscale export`'s)."""
    return os.path.isfile(os.path.join(path, MODEL_CONFIG))


def weight_files(folder: str) -> list[str]:
    """The files holding model folder `folder`'s weights: `model.safetensors`, or its shards
    as `model.safetensors.index.json` lists them, else the same for `pytorch_model.bin`."""
    for name in WEIGHTS_FILES:
        single = os.path.join(folder, name)
        if os.path.isfile(single):
            return [single]
        index = single + ".index.json"
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CorruptCheckpointError(f"{index!r} is no shard index (a JSON weight_map): {e}") from e
            files = [os.path.join(folder, shard) for shard in shards]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise CheckpointError(f"{index!r} lists shards that are not there: {', '.join(absent)}")
            return files
    raise CheckpointError(
        f"model folder {folder!r} has {MODEL_CONFIG} but no weights: expected "
        f"{' or '.join(WEIGHTS_FILES)} (or their shards with an .index.json)"
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in `path`, a checkpoint file or a model folder (unwrapped
    from its container, wrapper prefixes `module.` and `_orig_mod.` stripped)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _read_file(path)
    if not is_model_folder(path):
        raise CheckpointError(
            f"{path!r} is a folder, and {MODEL_CONFIG} does not exist in it: a model folder holds {MODEL_CONFIG} "
            f"and {' or '.join(WEIGHTS_FILES)} (a DeepSpeed checkpoint folder: `marscale export` it first)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(_read_file(file))
    return state


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(SAFETENSORS_SUFFIX):
        return _unwrap(read_safetensors(path), path)
    return _unwrap(load_file(path), path)


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    if _is_state_dict(obj):
        state = obj
    else:
        state = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    if state is None:
        raise CheckpointError(
            f"{path!r} has no state dict: expected tensors at the top level or under one of "
            f"{list(_WRAPPER_KEYS)}; found keys {sorted(map(str, obj))[:10]}"
        )
    state = {_COMPILE_PREFIX.sub(r"\1", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith(_WRAPPER_PREFIX) for k in state):
        state = {k[len(_WRAPPER_PREFIX) :]: v for k, v in state.items()}
    return state


def detect_layout(state: dict[str, torch.Tensor]) -> str | None:
    """Which of `LAYOUTS` the key names belong to (None when none fits)."""
    keys = list(state)
    if any(_hf_name(k).startswith(_HF_MARKERS) for k in keys):
        return "hf_videomae"
    if any(k.startswith("backbone.") for k in keys):
        return "mar_reference"
    own = ("classifier.", "head.fc_norm.", "head.head.", "decoder.encoder_to_decoder.", "decoder.mask_token")
    if any(k.startswith(own) for k in keys):
        return "marscale"
    if any(k.startswith("encoder.") for k in keys):
        # An encoder-only marscale dict lands here too; its names map unchanged either way.
        return "videomae_pretrain"
    if any(k.startswith("blocks.") for k in keys) and any(k.startswith("patch_embed.") for k in keys):
        return "videomae_finetune"
    return None


# Each mapping yields (key in file, marscale key | None for unexpected | IGNORE, tensor).
Entry = tuple[str, str | None, torch.Tensor]


def _map_marscale(state) -> Iterator[Entry]:
    for k, v in state.items():
        yield k, k, v


def _map_videomae_pretrain(state) -> Iterator[Entry]:
    for k, v in state.items():
        if k.startswith(("encoder.", "decoder.")):
            yield k, k, v
        elif k == "encoder_to_decoder.weight":
            yield k, "decoder.encoder_to_decoder.weight", v
        elif k == "mask_token":
            yield k, "decoder.mask_token", v
        elif k == "pos_embed":
            yield k, "encoder.pos_embed", v
        else:
            yield k, None, v


def _map_videomae_finetune(state) -> Iterator[Entry]:
    for k, v in state.items():
        if k.startswith(("patch_embed.", "blocks.", "norm.")) or k == "pos_embed":
            yield k, "encoder." + k, v
        elif k.startswith("fc_norm."):
            yield k, "head." + k, v
        elif k.startswith("head."):
            yield k, "head.head." + k[len("head.") :], v
        else:
            yield k, None, v


# MAR reference bridging-classifier block names (BaseTransformerLayer) -> marscale Block names.
_MAR_CLS_BLOCK = (
    ("norm.", "norm1."),
    ("attn.to_qkv.weight", "attn.qkv.weight"),
    ("attn.proj.", "attn.proj."),
    ("norm_ffn.", "norm2."),
    ("ffn.net.0.", "mlp.fc1."),
    ("ffn.net.3.", "mlp.fc2."),
)
_MAR_CLS_BLOCK_KEY = re.compile(r"cls_head\.blocks\.(\d+)\.(.+)")


def _map_mar_reference(state) -> Iterator[Entry]:
    """MAR reference (`MaeVitVideoModelWithClsVideoMAEBridgingClassifier`) -> marscale.

    backbone.* is the VideoMAE encoder; decoder.*, encoder_to_decoder and mask_token the
    VideoMAE decoder; encoder_to_cls_decoder is the bias-free Linear into the bridging
    classifier (`classifier.embed`) and cls_head.{blocks, norm, head} its blocks, fc_norm and
    final Linear. The reference's `pos_embed` is the decoder's sin-cos table, `mean`/`std`
    the input normalisation and `cls_head.mask_token` an unused parameter.

    The reference classifier's qkv Linear has a bias for q, k and v; ours has q and v only.
    The k bias adds q.b_k to every logit of a query alike, which softmax cancels, so leaving
    it out changes no output.
    """
    for k, v in state.items():
        m = _MAR_CLS_BLOCK_KEY.fullmatch(k)
        if k.startswith("backbone."):
            yield k, "encoder." + k[len("backbone.") :], v
        elif k.startswith("decoder."):
            yield k, k, v
        elif k == "encoder_to_decoder.weight":
            yield k, "decoder.encoder_to_decoder.weight", v
        elif k == "mask_token":
            yield k, "decoder.mask_token", v
        elif k == "pos_embed":
            yield k, "decoder.pos_embed", v
        elif k == "encoder_to_cls_decoder.weight":
            yield k, "classifier.embed.weight", v
        elif m and m.group(2) == "attn.to_qkv.bias":
            q, _, b = v.chunk(3)
            yield k, f"classifier.blocks.{m.group(1)}.attn.q_bias", q
            yield k, f"classifier.blocks.{m.group(1)}.attn.v_bias", b
        elif m:
            rest = m.group(2)
            for src, dst in _MAR_CLS_BLOCK:
                if rest.startswith(src):
                    yield k, f"classifier.blocks.{m.group(1)}.{dst}{rest[len(src):]}", v
                    break
            else:
                yield k, None, v
        elif k.startswith("cls_head.norm."):
            yield k, "classifier.head.fc_norm." + k[len("cls_head.norm.") :], v
        elif k.startswith("cls_head.head."):
            yield k, "classifier.head.head." + k[len("cls_head.head.") :], v
        elif k in ("mean", "std", "cls_head.mask_token"):
            yield k, IGNORE, v
        else:
            yield k, None, v


# transformers' VideoMAE block names (`VideoMAELayer`) -> marscale Block names. The
# query/value biases are `query.bias` / `value.bias` in the modules and `q_bias` / `v_bias`
# in the files of older releases, which `save_pretrained` still writes by default
# (`save_original_format`).
_HF_BLOCK = (
    ("layernorm_before.", "norm1."),
    ("attention.attention.query.bias", "attn.q_bias"),
    ("attention.attention.value.bias", "attn.v_bias"),
    ("attention.attention.q_bias", "attn.q_bias"),
    ("attention.attention.v_bias", "attn.v_bias"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_LAYER_KEY = re.compile(r"(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)")
_HF_PROJECTION = re.compile(r"attention\.attention\.(query|key|value)\.weight")
_HF_QKV = ("query", "key", "value")
_HF_MARKERS = ("embeddings.patch_embeddings.", "encoder.layer.", "decoder.decoder_layers.")
_HF_PREFIX = "videomae."


def _hf_name(key: str) -> str:
    """A transformers key without the `videomae.` prefix the task models put before the
    encoder (a bare `VideoMAEModel` saves it without)."""
    return key[len(_HF_PREFIX) :] if key.startswith(_HF_PREFIX) else key


def _map_hf_videomae(state) -> Iterator[Entry]:
    """transformers' VideoMAE (`VideoMAEForPreTraining`, `VideoMAEForVideoClassification`,
    `VideoMAEModel`) -> marscale.

    videomae.embeddings.patch_embeddings.projection is the tubelet Conv3d (transformers
    permutes its [B, T, C, H, W] input to marscale's [B, C, T, H, W] before it: the same
    weights); videomae.encoder.layer.N the encoder blocks and videomae.layernorm the final
    encoder norm (pre-training models, `use_mean_pooling: false`); fc_norm and classifier
    the full-token head (`ClassifierHead`: mean pool, fc_norm, Linear); encoder_to_decoder,
    mask_token and decoder.{decoder_layers.N, norm, head} the pre-training decoder.
    Each block's query, key and value Linears become one qkv weight, rows in that order
    (marscale's Attention splits them so), their biases (query and value only) its q_bias
    and v_bias.
    """
    projections: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for k, v in state.items():
        name = _hf_name(k)
        m = _HF_LAYER_KEY.fullmatch(name)
        if m:
            block = f"{'encoder' if m.group(1) == 'encoder.layer' else 'decoder'}.blocks.{m.group(2)}."
            rest = m.group(3)
            projection = _HF_PROJECTION.fullmatch(rest)
            if projection:
                projections.setdefault(block, {})[projection.group(1)] = (k, v)
                continue
            for src, dst in _HF_BLOCK:
                if rest.startswith(src):
                    yield k, f"{block}{dst}{rest[len(src):]}", v
                    break
            else:
                yield k, None, v
        elif name.startswith("embeddings.patch_embeddings.projection."):
            yield k, "encoder.patch_embed.proj." + name.rsplit(".", 1)[1], v
        elif name == "embeddings.position_embeddings":
            yield k, "encoder.pos_embed", v
        elif name.startswith("layernorm."):
            yield k, "encoder.norm." + name[len("layernorm.") :], v
        elif name.startswith("fc_norm."):
            yield k, "head." + name, v
        elif name.startswith("classifier."):
            yield k, "head.head." + name[len("classifier.") :], v
        elif name in ("encoder_to_decoder.weight", "mask_token"):
            yield k, "decoder." + name, v
        elif name == "position_embeddings":
            yield k, "decoder.pos_embed", v
        elif name.startswith(("decoder.norm.", "decoder.head.")):
            yield k, name, v
        else:
            yield k, None, v
    for block, found in projections.items():
        if len(found) < len(_HF_QKV):  # a part is missing: the model's qkv weight is reported as lacking
            for k, v in found.values():
                yield k, None, v
            continue
        src = found["query"][0].replace(".query.", ".{query,key,value}.")
        yield src, block + "attn.qkv.weight", torch.cat([found[n][1] for n in _HF_QKV])


MAPPINGS = {
    "videomae_pretrain": _map_videomae_pretrain,
    "videomae_finetune": _map_videomae_finetune,
    "hf_videomae": _map_hf_videomae,
    "mar_reference": _map_mar_reference,
    "marscale": _map_marscale,
}
