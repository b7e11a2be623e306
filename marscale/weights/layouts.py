"""Reading a checkpoint file safely, and the key names of each layout users bring.

`load_file` is the one way marscale unpickles a checkpoint file: `torch.load(weights_only=True)`,
so a file from the internet (or a planted one) can run no code here, with an explicit
allow-list of the few classes a kind of file legitimately holds: `argparse.Namespace` for
the files users bring (VideoMAE and MAE store their command line in every checkpoint), a
handful of DeepSpeed's own classes for DeepSpeed's files (`DEEPSPEED_GLOBALS`). Anything
else is an `UnsafeCheckpointError`; a truncated or foreign file a `CorruptCheckpointError`.

`read_checkpoint` unwraps the state dict and strips wrapper prefixes. `detect_layout`
names the layout from the keys, and `MAPPINGS[layout]` maps each key onto marscale's
parameter names (see `marscale.weights.pretrained` for the layouts and what loading checks).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import pickle
import re
from typing import Any, Iterator, Sequence

import torch

LAYOUTS = ("videomae_pretrain", "videomae_finetune", "mar_reference", "marscale")

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


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in `path` (unwrapped from its container, wrapper prefixes
    `module.` and `_orig_mod.` stripped)."""
    path = os.fspath(path)
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


MAPPINGS = {
    "videomae_pretrain": _map_videomae_pretrain,
    "videomae_finetune": _map_videomae_finetune,
    "mar_reference": _map_mar_reference,
    "marscale": _map_marscale,
}
