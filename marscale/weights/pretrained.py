"""Load pre-trained weights into a marscale model from the checkpoint layouts users bring.

Weights come as one file (a pickled PyTorch checkpoint, read with weights_only=True, or a
safetensors file), as a model folder (`config.json` beside `model.safetensors` or
`pytorch_model.bin`, sharded or not: transformers' `save_pretrained`, a Hub download,
`marscale export`), or as `hf:ORG/NAME`, a model in the local Hugging Face cache
(`marscale.weights.hf`). Five layouts are recognised from their key names (wrapper prefixes
are stripped first: DDP's `module.` and torch.compile's `_orig_mod.`):

- `videomae_pretrain`: VideoMAE pre-training, `{"model": {encoder.*, decoder.*,
  encoder_to_decoder.weight, mask_token}}`. Encoder and reconstruction decoder load; the
  classifier starts fresh (fine-tuning from a pre-training checkpoint).
- `videomae_finetune`: VideoMAE fine-tuned, `{"module" or "model": {patch_embed.*, blocks.N.*,
  fc_norm.*, head.*}}`: the encoder and the full-token baseline head (`ViTClassifier`).
- `hf_videomae`: transformers' VideoMAE (`VideoMAEForPreTraining`,
  `VideoMAEForVideoClassification`): `videomae.*` is the encoder, the pre-training decoder
  and `fc_norm`/`classifier` (the full-token head) map onto marscale's modules (see
  `layouts._map_hf_videomae`). Its config.json is checked against the model first
  (`hf.check_config`: head counts are not in the weights).
- `mar_reference`: the MAR reference code, `{"model_state": {backbone.*, decoder.*,
  encoder_to_decoder.weight, mask_token, encoder_to_cls_decoder.weight, cls_head.*}}`.
  Its bridging classifier uses other block names (`norm`, `attn.to_qkv`, `norm_ffn`,
  `ffn.net.0/3`) and a full qkv bias; see `_map_mar_reference`.
- `marscale`: marscale's own parameter names (what `marscale export` writes).

A checkpoint must fit the model whole unless the caller asks for a partial load. Missing
encoder weights, and weights that fall inside the model's own modules without fitting them
(decoder blocks 4-11 for a 4-block decoder, another width), are `CheckpointError`s that
name the setting to change (`set model.decoder.depth=12`). Weights of modules the model
does not have (a decoder when it is switched off, the full-token head in a MAR model) are
reported as unexpected; a classifier head of another shape (another label set) is dropped
and reported.

Position tables are never loaded: marscale's are fixed sin-cos buffers. A table found in a
file is skipped when it is that fixed table (of any clip size, with a note when the size
differs from the model's); a table with other values (learned positions) is an error, since
the model could not use them.

The load report counts what loaded per part of the model and says where the file's modules
went (`videomae.encoder.layer.0-11 -> encoder.blocks.0-11`). `load_state` checks and loads
a state dict already in memory (a DeepSpeed checkpoint `marscale eval` consolidated); with
`need_classifier` (evaluation) it also refuses weights that would leave any of the encoder
or classifier at its initialisation, in one line naming the setting (`model.num_classes`).

Reading files (`torch.load(weights_only=True)`, safetensors without unpickling: a checkpoint
from the internet can run no code here) and the key names of each layout are in
`marscale/weights/layouts.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import torch
import torch.nn as nn

from marscale.weights import hf
from marscale.weights.layouts import IGNORE, LAYOUTS, MAPPINGS, CheckpointError, detect_layout, read_checkpoint
from marscale.core.clip import ClipConfig
from marscale.model.config import VARIANTS
from marscale.model.layers import sincos_table

logger = logging.getLogger(__name__)

# The final classifier Linear: its shape depends on the dataset, so a mismatch drops it.
_HEAD_KEYS = frozenset(
    {"head.head.weight", "head.head.bias", "classifier.head.head.weight", "classifier.head.head.bias"}
)
_POSITION_TABLE_NAMES = ("pos_embed", "pos_embd")
_MAX_LISTED = 5
_SHAPES_LISTED = 2

GROUPS = ("encoder", "decoder", "classifier", "other")
"""The parts of a model a load report counts keys by."""

# First matching prefix wins. Marscale names and the names of every layout: VideoMAE
# fine-tuned (`blocks.`, `fc_norm.`, `head.`), pre-training (`encoder_to_decoder`,
# `mask_token`), transformers (`videomae.`, `classifier.`, `position_embeddings`: the
# decoder's table), the MAR reference (`backbone.`, `cls_head.`, `encoder_to_cls_decoder`).
_GROUP_PREFIXES = (
    ("classifier", ("classifier.", "head.", "fc_norm.", "cls_head.", "encoder_to_cls_decoder.")),
    ("decoder", ("decoder.", "encoder_to_decoder.", "mask_token", "position_embeddings")),
    ("encoder", ("encoder.", "backbone.", "blocks.", "patch_embed.", "norm.", "videomae.", "embeddings.",
                 "layernorm.")),
)


def key_group(key: str) -> str:
    """Which of `GROUPS` a key belongs to, in marscale's names or a checkpoint layout's."""
    return next((group for group, prefixes in _GROUP_PREFIXES if key.startswith(prefixes)), "other")


@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did. Key lists use marscale names except `unexpected` and
    `ignored`, which hold the names found in the file."""

    path: str
    layout: str
    partial: bool = False
    """Whether the caller allowed a partial load."""
    loaded: list[str] = dataclasses.field(default_factory=list)
    """Model keys filled from the file."""
    missing: list[str] = dataclasses.field(default_factory=list)
    """Model keys the file did not fill (they keep their initialisation)."""
    unexpected: list[str] = dataclasses.field(default_factory=list)
    """File keys with no place in this model."""
    dropped: list[str] = dataclasses.field(default_factory=list)
    """Model keys present in the file with another shape and left out: the classifier head
    (another label set); with `partial`, anything else of another shape."""
    ignored: list[str] = dataclasses.field(default_factory=list)
    """File keys skipped on purpose (position tables, the MAR reference's input mean/std)."""
    placed: list[str] = dataclasses.field(default_factory=list)
    """Where the file's modules went, where the names differ: `file module -> model module`
    (`videomae.encoder.layer.0-11 -> encoder.blocks.0-11`)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Human-readable remarks (shape of a dropped head, a position table for another clip size)."""

    @property
    def missing_encoder(self) -> list[str]:
        return [k for k in self.missing if k.startswith("encoder.")]

    def by_group(self) -> dict[str, dict[str, int]]:
        """Counts of loaded / missing / unexpected / dropped keys per part of the model."""
        counts = {g: dict.fromkeys(("loaded", "missing", "unexpected", "dropped"), 0) for g in GROUPS}
        for kind in ("loaded", "missing", "unexpected", "dropped"):
            for key in getattr(self, kind):
                counts[key_group(key)][kind] += 1
        return counts

    def to_json(self) -> dict:
        """The report as plain data (`load_report.json` in a run folder)."""
        return {**dataclasses.asdict(self), "groups": self.by_group()}

    def __str__(self) -> str:
        partial = ", partial load allowed" if self.partial else ""
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} (layout {self.layout}{partial})"]
        lines.append(f"  {'':<11}{'loaded':>8}{'missing':>9}{'unexpected':>12}{'dropped':>9}")
        for group, c in self.by_group().items():
            if any(c.values()):
                lines.append(
                    f"  {group:<11}{c['loaded']:>8}{c['missing']:>9}{c['unexpected']:>12}{c['dropped']:>9}"
                )
        for name, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("dropped", self.dropped),
            ("ignored", self.ignored),
        ):
            if keys:
                lines.append(f"  {name} ({len(keys)}): {_summarise(keys)}")
        lines.extend(f"  placed: {p}" for p in self.placed)
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


_BLOCK_KEY = re.compile(r"(.*\bblocks)\.(\d+)\.")
_LIST_KEY = re.compile(r"(.*?)\.(\d+)\.")  # the first numbered module list in a key


def _placements(pairs: list[tuple[str, str]]) -> list[str]:
    """`file module -> model module` for the (file key, model key) pairs whose names
    differ, module lists as index ranges: `videomae.encoder.layer.0-1 -> encoder.blocks.0-1`."""

    def module(key: str) -> tuple[str, int | None]:
        m = _LIST_KEY.match(key)
        if m:
            return m.group(1), int(m.group(2))
        parent, _, leaf = key.rpartition(".")
        return (parent if parent and leaf in ("weight", "bias") else key), None

    found: dict[tuple[str, str], tuple[set[int], set[int]]] = {}
    for src, ours in pairs:
        (src_module, i), (our_module, j) = module(src), module(ours)
        if (src_module, i) == (our_module, j):
            continue
        mine, theirs = found.setdefault((src_module, our_module), (set(), set()))
        if i is not None:
            mine.add(i)
        if j is not None:
            theirs.add(j)

    def name(prefix: str, indices: set[int]) -> str:
        return f"{prefix}.{_index_ranges(indices)}" if indices else prefix

    return [f"{name(s, i)} -> {name(o, j)}" for (s, o), (i, j) in found.items()]


def _index_ranges(indices: set[int]) -> str:
    """{1, 4, 5, 6} -> "1,4-6"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _describe(keys: list[str]) -> str:
    """Keys for an error message: each of them when few, else blocks as index ranges
    (`decoder.blocks.4-11.*`) and the rest grouped as in the report."""
    if len(keys) <= _MAX_LISTED:
        return ", ".join(keys)
    blocks: dict[str, set[int]] = {}
    others = []
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
        else:
            others.append(k)
    parts = [f"{prefix}.{_index_ranges(indices)}.*" for prefix, indices in blocks.items()]
    if others:
        parts.append(_summarise(others))
    return ", ".join(parts)


def _table_atol(dtype: torch.dtype) -> float:
    # A table stored in half precision is the fixed one rounded: allow two of its ulps.
    return max(1e-4, 2 * torch.finfo(dtype).eps)


def _check_position_table(
    src: str, ours: str, tensor: torch.Tensor, model_shapes: dict[str, torch.Size]
) -> tuple[str | None, str | None]:
    """(error, note) for a position table stored in a checkpoint.

    The model's tables are fixed sin-cos buffers, so a stored one is skipped. That loses
    nothing when it is the same fixed table (of any size: VideoMAE's table for another clip
    size is still the formula); anything else is a learned table the model cannot use.
    """
    stored = tensor.reshape(tensor.shape[-2:]) if tensor.ndim == 3 and tensor.shape[0] == 1 else tensor
    if stored.ndim != 2 or not stored.is_floating_point():
        return f"position table {src} has shape {tuple(tensor.shape)}, not [positions, width]", None
    fixed = sincos_table(*stored.shape)
    if not torch.allclose(stored.float(), fixed, atol=_table_atol(stored.dtype), rtol=0):
        error = (
            f"position table {src} {tuple(tensor.shape)} is not the fixed sin-cos table (learned positions?): "
            f"marscale's position tables are fixed, so the checkpoint's positions would be lost"
        )
        return error, None
    shape = model_shapes.get(ours)
    if shape is not None and stored.shape != shape:
        note = (
            f"position table {src} is the fixed sin-cos table for {stored.shape[0]} positions; the model's "
            f"{ours} has {shape[0]} (another clip size) and is used"
        )
        return None, note
    return None, None


def _in_own_modules(model: nn.Module, key: str) -> bool:
    """Whether `key` (a marscale name) falls inside one of the model's modules.

    True for `decoder.blocks.11.norm1.weight` in a 4-block decoder (the module list is
    there, block 11 is not) and for an unknown tensor of an existing module. False when the
    model has no such top-level module (a switched-off decoder, the other architecture's
    head) or the module is a switched-off feature without tensors (`nn.Identity` in place of
    the full-token baseline's final encoder norm): those weights are unexpected, not misfits.
    """
    module, parts = model, key.split(".")
    if len(parts) == 1:
        return False  # a tensor of the model itself: none of its modules
    for depth, name in enumerate(parts[:-1]):
        child = module._modules.get(name)
        if child is None:
            return depth > 0
        module = child
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# Where a part's width can be read, as (key, dim), after `{part}.blocks.N.norm1.weight`.
_WIDTH_KEYS = {
    "encoder": (("encoder.patch_embed.proj.weight", 0), ("encoder.norm.weight", 0)),
    "decoder": (("decoder.norm.weight", 0), ("decoder.mask_token", -1), ("decoder.encoder_to_decoder.weight", 0)),
    "classifier": (("classifier.embed.weight", 0), ("classifier.head.fc_norm.weight", 0)),
}


def _sizes(shapes: dict[str, torch.Size]) -> dict[str, tuple[int | None, int | None]]:
    """(depth, width) of encoder, decoder and bridging classifier, read from marscale key
    names and shapes (None where the keys do not tell)."""
    sizes = {}
    for part, width_keys in _WIDTH_KEYS.items():
        block = re.compile(rf"{part}\.blocks\.(\d+)\.(.+)")
        blocks = [(int(m.group(1)), m.group(2), k) for k in shapes if (m := block.fullmatch(k))]
        depth = 1 + max(i for i, _, _ in blocks) if blocks else None
        candidates = [(k, 0) for _, rest, k in blocks if rest == "norm1.weight"] + list(width_keys)
        width = next((shapes[k][d] for k, d in candidates if k in shapes), None)
        sizes[part] = (depth, width)
    return sizes


def _blocks(n: int) -> str:
    return f"{n} block{'s' if n != 1 else ''}"


def _fixes(file_shapes: dict[str, torch.Size], model_shapes: dict[str, torch.Size]) -> list[str]:
    """The settings that would make the model's sizes those of the checkpoint."""
    theirs, ours = _sizes(file_shapes), _sizes(model_shapes)
    fixes = []
    (e_depth, e_width), (m_depth, m_width) = theirs["encoder"], ours["encoder"]
    if (e_depth, e_width) != (m_depth, m_width) and None not in (e_depth, e_width, m_depth, m_width):
        match = [n for n, v in VARIANTS.items() if (v.encoder.depth, v.encoder.embed_dim) == (e_depth, e_width)]
        where = f"set model.variant={match[0]}" if match else "no model.variant has that encoder"
        fixes.append(
            f"{where} (the checkpoint's encoder has {_blocks(e_depth)} {e_width} wide, the model's "
            f"{_blocks(m_depth)} {m_width} wide)"
        )
        if match:  # that variant brings its own decoder size: compare the file's with it
            table = VARIANTS[match[0]].decoder
            ours["decoder"] = (table.depth, table.embed_dim)
    patch = "encoder.patch_embed.proj.weight"
    if patch in file_shapes and patch in model_shapes and file_shapes[patch][2:] != model_shapes[patch][2:]:
        t, p, _ = file_shapes[patch][2:]
        fixes.append(
            f"set clip.tubelet_size={t} (the checkpoint's tubelets are {t}x{p}x{p} pixels, the model's "
            f"{'x'.join(map(str, model_shapes[patch][2:]))})"
        )
    for part, section in (("decoder", "model.decoder"), ("classifier", "model.bridge")):
        (f_depth, f_width), (m_depth, m_width) = theirs[part], ours[part]
        if f_depth is not None and m_depth is not None and f_depth != m_depth:
            fixes.append(
                f"set {section}.depth={f_depth} (the checkpoint's {part} has {_blocks(f_depth)}, "
                f"the model's {m_depth})"
            )
        if f_width is not None and m_width is not None and f_width != m_width:
            fixes.append(
                f"set {section}.embed_dim={f_width} and {section}.num_heads to the checkpoint's (its {part} "
                f"is {f_width} wide, the model's {m_width}; head counts are not stored)"
            )
    return fixes


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
    model: nn.Module,
    path: str | os.PathLike,
    *,
    clip: ClipConfig | None = None,
    partial: bool = False,
    need_classifier: bool = False,
) -> LoadReport:
    """Load the weights `path` names into `model` (a `MARModel` or `ViTClassifier`): a
    checkpoint file, a model folder or `hf:ORG/NAME` (the module docstring).

    With `clip`, the input normalisation a checkpoint stores (MAR reference,
    preprocessor_config.json) is compared with the clip section's and a difference is noted
    in the report. A transformers folder's config.json must describe the model
    (`hf.check_config`). Then `load_state`.
    """
    name = os.fspath(path)
    path = hf.locate(name)
    state = read_checkpoint(path)
    layout = _layout(state, name)
    notes = [] if path == name else [f"{name} is {path} in the local Hugging Face cache"]
    if layout == "hf_videomae":
        config = hf.read_config(path)
        if config is None:
            notes.append(
                f"no {hf.MODEL_CONFIG} beside the weights: head counts and the clip it was trained on unchecked"
            )
        else:
            notes += hf.check_config(config, model, list(state), source=name, clip=clip)
    return load_state(
        model, state, source=name, layout=layout, clip=clip, partial=partial, need_classifier=need_classifier,
        notes=notes,
    )


def _layout(state: dict[str, torch.Tensor], source: str) -> str:
    layout = detect_layout(state)
    if layout is None:
        raise CheckpointError(
            f"{source!r}: the key names match no known layout ({', '.join(LAYOUTS)}); "
            f"first keys: {list(state)[:_MAX_LISTED]}"
        )
    return layout


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    layout: str | None = None,
    clip: ClipConfig | None = None,
    partial: bool = False,
    need_classifier: bool = False,
    notes: list[str] | tuple[str, ...] = (),
) -> LoadReport:
    """Load state dict `state` (read from `source`, named in messages; in `layout`, else
    detected from its keys) into `model`.

    The checkpoint must fit the model whole, or `CheckpointError` says what does not fit
    and which setting would make it fit. Not fitting: missing encoder weights; a weight that
    falls inside the model's own modules but names no tensor there (an extra block); a
    weight of another shape (another width); a decoder or classifier the file holds only
    part of; a learned position table. With `partial`, those are left out and reported
    instead, and the model keeps its initialisation there. Always allowed: a classifier
    head of another shape (another label set: dropped and reported), and a decoder or
    classifier absent from the file (fine-tuning from a pre-training checkpoint, or a
    fine-tuned one without the decoder); with `need_classifier` (the model will score
    clips with these weights) neither is, and `partial` is not offered. Tensors are cast to
    the dtype of the model's tensors. Nothing in the model changes when an error is raised.

    The report is logged, at WARNING when anything is missing or dropped.
    """
    layout = layout or _layout(state, source)
    report = LoadReport(path=source, layout=layout, partial=partial, notes=list(notes))
    own = model.state_dict()
    # Non-persistent buffers (the sin-cos tables) are not in state_dict().
    table_shapes = {n: b.shape for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in _POSITION_TABLE_NAMES}

    new: dict[str, torch.Tensor] = {}
    file_shapes: dict[str, torch.Size] = {}  # marscale name -> shape in the file, for the fixes
    no_place: list[str] = []  # file keys inside the model's modules that name no tensor there
    other_shape: list[str] = []  # file keys whose model tensor has another shape (not the head)
    table_errors: list[str] = []
    placed: list[tuple[str, str]] = []  # (file key, model key) of what loaded
    head_classes = None  # the number of classes of a classifier head of another shape
    for src, ours, tensor in MAPPINGS[layout](state):
        if ours is not None and ours != IGNORE:
            file_shapes[ours] = tensor.shape
        if ours == IGNORE:
            report.ignored.append(src)
        elif ours is not None and ours.rsplit(".", 1)[-1] in _POSITION_TABLE_NAMES:
            report.ignored.append(src)
            error, note = _check_position_table(src, ours, tensor, table_shapes)
            if error:
                table_errors.append(error)
            if note:
                report.notes.append(note)
        elif ours is None or ours not in own:
            report.unexpected.append(src)
            if ours is not None and _in_own_modules(model, ours):
                no_place.append(src)
        elif tensor.shape != own[ours].shape:
            report.dropped.append(ours)
            if ours not in _HEAD_KEYS:
                model_name = "the model's" if src == ours else f"the model's {ours}"
                other_shape.append(f"{src} {tuple(tensor.shape)} vs {model_name} {tuple(own[ours].shape)}")
            elif ours.endswith(".weight"):
                head_classes = tensor.shape[0]
                report.notes.append(
                    f"classifier head {ours.rsplit('.', 1)[0]} not loaded: {tuple(tensor.shape)} in the "
                    f"checkpoint, {tuple(own[ours].shape)} in the model (another number of classes); it keeps "
                    f"its initialisation"
                )
        else:
            new[ours] = tensor.to(dtype=own[ours].dtype)
            placed.append((src, ours))
    order = {k: i for i, k in enumerate(own)}
    report.placed = _placements(sorted(placed, key=lambda pair: order[pair[1]]))  # in the model's order
    if layout == "mar_reference":
        _check_normalisation(state, clip, report.notes)

    report.loaded = list(new)
    report.missing = [k for k in own if k not in new]
    # The encoder always loads whole; a decoder or classifier the file holds must load whole.
    held = {key_group(k) for k in file_shapes if k in own} - {"encoder", "other"}
    lacking = [
        k
        for k in report.missing
        if k not in report.dropped and (k.startswith("encoder.") or key_group(k) in held)
    ]
    misfits = table_errors[:]
    if no_place:
        misfits.append(f"{len(no_place)} weights have no place in the model's modules: {_describe(no_place)}")
    if other_shape:
        shown = ", ".join(other_shape[:_SHAPES_LISTED]) + (", ..." if len(other_shape) > _SHAPES_LISTED else "")
        misfits.append(f"{len(other_shape)} weights have another shape: {shown}")
    if lacking:
        misfits.append(f"it lacks {len(lacking)} weights of the model: {_describe(lacking)}")
    if misfits and (need_classifier or not partial):
        fixes = _fixes(file_shapes, {k: v.shape for k, v in own.items()})
        fix = f" To fit it, {'; '.join(fixes)}." if fixes else ""
        offer = (
            "" if need_classifier else " To load only what fits and start the rest from its initialisation, "
            "set model.pretrained_partial: true (partial=True)"
        )
        raise CheckpointError(f"{source!r} (layout {layout}) does not fit the model: {'; '.join(misfits)}.{fix}{offer}")
    if need_classifier:
        _check_trained(report, source, head_classes, own)
    report.notes.extend(f"partial load, left out: {m}" for m in misfits)
    model.load_state_dict(new, strict=False)
    logger.log(logging.WARNING if report.missing or report.dropped else logging.INFO, "%s", report)
    return report


def _check_trained(report: LoadReport, path: str, head_classes: int | None, own: dict[str, torch.Tensor]) -> None:
    """Refuse weights that would leave any of the encoder or classifier at its
    initialisation (a pre-training checkpoint, another label set): the model would score
    with random weights there."""
    untrained = [k for k in dict.fromkeys(report.missing + report.dropped) if not k.startswith("decoder.")]
    if not untrained:
        return
    if head_classes is not None:
        head = next(k for k in own if k in _HEAD_KEYS and k.endswith(".weight"))
        raise CheckpointError(
            f"{path!r} holds a classifier for {head_classes} classes, the model has {own[head].shape[0]}: set "
            f"model.num_classes={head_classes}"
        )
    raise CheckpointError(
        f"{path!r} has no trained classifier for this model: {len(untrained)} weights would stay at their "
        f"initialisation ({_describe(untrained)}); evaluate a fine-tuned checkpoint"
    )
