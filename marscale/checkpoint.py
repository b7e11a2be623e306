"""Load pre-trained weights into a marscale model from the checkpoint layouts users bring.

Four layouts are recognised from their key names (a DDP `module.` prefix is stripped first):

- `videomae_pretrain`: VideoMAE pre-training, `{"model": {encoder.*, decoder.*,
  encoder_to_decoder.weight, mask_token}}`. Encoder and reconstruction decoder load; the
  classifier starts fresh (fine-tuning from a pre-training checkpoint).
- `videomae_finetune`: VideoMAE fine-tuned, `{"module" or "model": {patch_embed.*, blocks.N.*,
  fc_norm.*, head.*}}`: the encoder and the full-token baseline head (`ViTClassifier`).
- `mar_reference`: the MAR reference code, `{"model_state": {backbone.*, decoder.*,
  encoder_to_decoder.weight, mask_token, encoder_to_cls_decoder.weight, cls_head.*}}`.
  Its bridging classifier uses other block names (`norm`, `attn.to_qkv`, `norm_ffn`,
  `ffn.net.0/3`) and a full qkv bias; see `_map_mar_reference`.
- `marscale`: marscale's own parameter names (what `marscale export` writes).

Position tables are never loaded: marscale's are fixed sin-cos buffers. A table found in a
file is skipped, with a note when its shape or values differ from ours (a learned table,
or one made for another clip size, would otherwise be lost silently).

Files are read with `torch.load(weights_only=True)`: a checkpoint from the internet can
run no code here. `argparse.Namespace` is allowed because VideoMAE and MAE store their
command line (`args`) in every checkpoint they write.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re
from typing import Iterator

import torch
import torch.nn as nn

from marscale.clip import ClipConfig

logger = logging.getLogger(__name__)

LAYOUTS = ("videomae_pretrain", "videomae_finetune", "mar_reference", "marscale")

# Keys that may hold the state dict inside a checkpoint file, most specific first.
_WRAPPER_KEYS = ("model_state", "module", "model", "state_dict")
# The final classifier Linear: its shape depends on the dataset, so a mismatch drops it.
_HEAD_KEYS = frozenset(
    {"head.head.weight", "head.head.bias", "classifier.head.head.weight", "classifier.head.head.bias"}
)
_POSITION_TABLE_NAMES = ("pos_embed", "pos_embd")
_SAFE_GLOBALS = [argparse.Namespace]
_MAX_LISTED = 5

_IGNORE = "<ignored>"  # mapping target: a key the layout is known to hold and we skip


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model. The message names the file."""


@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did. Key lists use marscale names except `unexpected` and
    `ignored`, which hold the names found in the file."""

    path: str
    layout: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    """Model keys filled from the file."""
    missing: list[str] = dataclasses.field(default_factory=list)
    """Model keys the file did not fill (they keep their initialisation)."""
    unexpected: list[str] = dataclasses.field(default_factory=list)
    """File keys with no place in this model."""
    dropped: list[str] = dataclasses.field(default_factory=list)
    """Model keys present in the file with another shape and left out (the classifier head)."""
    ignored: list[str] = dataclasses.field(default_factory=list)
    """File keys skipped on purpose (position tables, the MAR reference's input mean/std)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Human-readable remarks (shape of a dropped head, a position table that differs)."""

    @property
    def missing_encoder(self) -> list[str]:
        return [k for k in self.missing if k.startswith("encoder.")]

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} (layout {self.layout})"]
        for name, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("dropped", self.dropped),
            ("ignored", self.ignored),
        ):
            if keys:
                lines.append(f"  {name} ({len(keys)}): {_summarise(keys)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 8) -> str:
    """Group `blocks.N.` keys so that a whole missing decoder fits on one line."""
    groups: dict[str, int] = {}
    for k in keys:
        pattern = re.sub(r"\.blocks\.\d+\.", ".blocks.*.", k)
        groups[pattern] = groups.get(pattern, 0) + 1
    shown = [p if n == 1 else f"{p} (x{n})" for p, n in groups.items()]
    more = f", ... {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in `path` (unwrapped from its container, `module.` stripped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (or is not a file)")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"checkpoint {path!r} holds Python objects other than tensors and plain containers, so it "
                f"is refused (read with weights_only=True). {reason} If you trust the file, extract its "
                f"weights once: torch.save(torch.load(path, weights_only=False)[KEY], 'weights.pt'), KEY "
                f"being the entry that holds the state dict."
            ) from e
        raise CheckpointError(f"{path!r} is not a PyTorch checkpoint ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # A truncated zip, random bytes or an empty file surface as any of these.
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return _unwrap(obj, path)


def _torch_load(path: str):
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5 has only the process-wide allowlist
        torch.serialization.add_safe_globals(_SAFE_GLOBALS)
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


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
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
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


# Each mapping yields (key in file, marscale key | None for unexpected | _IGNORE, tensor).
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
            yield k, _IGNORE, v
        else:
            yield k, None, v


_MAPPINGS = {
    "videomae_pretrain": _map_videomae_pretrain,
    "videomae_finetune": _map_videomae_finetune,
    "mar_reference": _map_mar_reference,
    "marscale": _map_marscale,
}


def _position_table_note(src: str, ours: str, tensor: torch.Tensor, tables: dict[str, torch.Tensor]) -> str | None:
    table = tables.get(ours)
    if table is None:
        return None
    stored = tensor.reshape(tensor.shape[-2:]) if tensor.ndim == 3 and tensor.shape[0] == 1 else tensor
    if stored.shape != table.shape:
        return (
            f"position table {src} has shape {tuple(tensor.shape)}, the model's {ours} is "
            f"{tuple(table.shape)} (made for another clip size); not loaded, the model's fixed table is used"
        )
    if table.device.type != "meta" and not torch.allclose(stored.float(), table.float().cpu(), atol=1e-4):
        return f"position table {src} differs from the fixed sin-cos table (learned?); not loaded"
    return None


def _check_normalisation(state, clip: ClipConfig | None, notes: list[str]) -> None:
    """The MAR reference stores the input mean/std: say so when they differ from the clip's."""
    if clip is None:
        return
    for name in ("mean", "std"):
        if name in state:
            stored = state[name].flatten().float()
            expected = torch.tensor(getattr(clip, name), dtype=torch.float32)
            if stored.shape != expected.shape or not torch.allclose(stored, expected, atol=1e-4):
                notes.append(
                    f"checkpoint was trained on inputs normalised with {name} {stored.tolist()}, "
                    f"the config says clip.{name} {list(getattr(clip, name))}"
                )


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, clip: ClipConfig | None = None, partial: bool = False
) -> LoadReport:
    """Load the weights in `path` into `model` (a `MARModel` or `ViTClassifier`).

    With `clip`, the input normalisation a checkpoint stores (MAR reference) is compared
    with the clip section's and a difference is noted in the report.

    A classifier head of another shape (another dataset) is dropped and reported. Missing
    encoder weights raise `CheckpointError` unless `partial`; a missing decoder or
    classifier is normal when fine-tuning from a pre-training checkpoint. Any other shape
    mismatch raises. Tensors are cast to the dtype of the model's tensors. Nothing in the
    model changes when an error is raised.
    """
    path = os.fspath(path)
    state = read_checkpoint(path)
    layout = detect_layout(state)
    if layout is None:
        raise CheckpointError(
            f"{path!r}: the key names match no known layout ({', '.join(LAYOUTS)}); "
            f"first keys: {list(state)[:_MAX_LISTED]}"
        )
    report = LoadReport(path=path, layout=layout)
    own = model.state_dict()
    # Non-persistent buffers (the sin-cos tables) are not in state_dict().
    tables = {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in _POSITION_TABLE_NAMES}

    new: dict[str, torch.Tensor] = {}
    for src, ours, tensor in _MAPPINGS[layout](state):
        if ours == _IGNORE:
            report.ignored.append(src)
        elif ours is not None and ours.rsplit(".", 1)[-1] in _POSITION_TABLE_NAMES:
            report.ignored.append(src)
            note = _position_table_note(src, ours, tensor, tables)
            if note:
                report.notes.append(note)
        elif ours is None or ours not in own:
            report.unexpected.append(src)
        elif tensor.shape != own[ours].shape:
            if ours not in _HEAD_KEYS:
                raise CheckpointError(
                    f"{path!r}: {src} has shape {tuple(tensor.shape)} in the checkpoint but the model's "
                    f"{ours} has shape {tuple(own[ours].shape)}; is model.variant (or img_size, "
                    f"tubelet_size) the one the checkpoint was trained with?"
                )
            report.dropped.append(ours)
            if ours.endswith(".weight"):
                report.notes.append(
                    f"classifier head {ours.rsplit('.', 1)[0]} not loaded: {tuple(tensor.shape)} in the checkpoint, "
                    f"{tuple(own[ours].shape)} in the model (another number of classes); it keeps its initialisation"
                )
        else:
            new[ours] = tensor.to(dtype=own[ours].dtype)
    if layout == "mar_reference":
        _check_normalisation(state, clip, report.notes)

    report.loaded = list(new)
    report.missing = [k for k in own if k not in new]
    if report.missing_encoder and not partial:
        missing = report.missing_encoder
        raise CheckpointError(
            f"{path!r} (layout {layout}) lacks {len(missing)} encoder weights, e.g. "
            f"{missing[:_MAX_LISTED]}; pass partial=True to start those from their initialisation"
        )
    model.load_state_dict(new, strict=False)
    logger.info("%s", report)
    return report
