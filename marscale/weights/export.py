"""Consolidate a DeepSpeed checkpoint of any ZeRO stage into one fp32 state dict.

- ZeRO 1, 2, 3: the fp32 master weights are spread over the ranks' optimizer shards;
  DeepSpeed's `zero_to_fp32` merges them (no process group, any machine).
- ZeRO 0: the module weights saved by rank 0 (cast to fp32; under bf16/fp16 they are the
  half-precision copy the model computed with).

`marscale export` writes marscale's own parameter names, which
`marscale.weights.pretrained.load_pretrained` detects as its "marscale" layout and
`marscale eval --checkpoint` reads, in one of two forms (`EXPORT_FORMATS`):

- `safetensors` (the default): a folder holding `model.safetensors` (tensors and a JSON
  header: reading it runs no code, maps the file instead of unpickling it, and any
  language reads it) and `config.json`, ``{"format": "marscale", "step": N, "config": the
  training config, "class_names": [...]}``;
- `torch` (`--format torch`, or an `--out` ending in .pt or .pth, as earlier versions
  wrote it): one pickled file ``{"model": state dict, "config": the training config, "step": N,
  "class_names": [...]}``.

The class names by label are the ones the checkpoint stored (its training shards'
manifest); None for checkpoints written before they were stored.

The checkpoint is checked first (`checkpointing.find_checkpoint`: intact, every file safe
to unpickle; a run folder falls back to its newest intact checkpoint), and every file is
read with weights_only=True, DeepSpeed's `zero_to_fp32` included (`weights_only_loads`).
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any, Literal

import safetensors.torch
import torch

from marscale.core.io import PARTIAL_SUFFIX, write_json
from marscale.weights.layouts import (
    MODEL_CONFIG,
    SAFETENSORS_SUFFIX,
    WEIGHTS_FILES,
    CheckpointError,
    load_file,
    read_config_json,
)
from marscale.checkpoints.integrity import read_model_states, weights_only_loads
from marscale.checkpoints.folders import find_checkpoint, step_of

logger = logging.getLogger(__name__)

ExportFormat = Literal["safetensors", "torch"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("safetensors", "torch")
TORCH_SUFFIXES = (".pt", ".pth")
"""An `--out` with one of these names a single pickled file: the `torch` form."""
EXPORT_RECORD = "marscale"
"""config.json's `format` in a folder `marscale export` wrote (transformers' has `model_type`)."""


def has_zero_shards(path: str) -> bool:
    """Whether the checkpoint keeps its fp32 weights in ZeRO optimizer shards (stage >= 1)."""
    return bool(glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")))


def consolidate(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict, marscale client state) of the checkpoint `find_checkpoint(path)`."""
    return consolidate_checked(find_checkpoint(path))


def consolidate_checked(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`consolidate` of a `step-N` folder that `find_checkpoint` has checked (it is not
    checked again: the check hashes every file)."""
    states = read_model_states(path)
    client = states.get("marscale", {})
    if has_zero_shards(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(path))
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        state = states["module"]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    return state, client


def default_format(out: str) -> ExportFormat:
    """`torch` for an `--out` ending in .pt or .pth (the single file earlier versions wrote),
    else `safetensors` (a folder)."""
    return "torch" if out.endswith(TORCH_SUFFIXES) else "safetensors"


def read_export_record(path: str) -> dict[str, Any] | None:
    """The config.json `marscale export` wrote beside weights `path` (a model folder, or a
    file in one); None when there is none or it is another kind (transformers')."""
    record = read_config_json(path)
    return record if isinstance(record, dict) and record.get("format") == EXPORT_RECORD else None


def exported_config(path: str) -> dict[str, Any] | None:
    """The training config stored by `marscale export` with weights `path`: in config.json
    for a model folder or a safetensors file (read without touching the weights), in the
    file itself for the single-file form; None for weights of another origin. A file that
    is no checkpoint is a `CheckpointError` naming it."""
    if os.path.isdir(path) or path.endswith(SAFETENSORS_SUFFIX):
        record = read_export_record(path)
        config = record.get("config") if record else None
        return config if isinstance(config, dict) else None
    obj = load_file(path, mmap=True)  # the weights are read later, by load_pretrained
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    config = obj.get("config")
    return config if isinstance(config, dict) else None


def stored_class_names(path: str, folder: str | None) -> list[str] | None:
    """The class names by label stored with the weights: in the checkpoint `folder`'s
    client state, else in what `marscale export` wrote at `path` (config.json, or the
    single file), or a transformers config.json's `id2label`; None when none were stored
    (older checkpoints, other origins, transformers' placeholder LABEL_i names)."""
    if folder is not None:
        names = read_model_states(folder).get("marscale", {}).get("class_names")
    elif os.path.isdir(path) or path.endswith(SAFETENSORS_SUFFIX):
        record = read_config_json(path)
        names = record.get("class_names") if isinstance(record, dict) else None
        if isinstance(record, dict) and record.get("format") != EXPORT_RECORD:
            names = _id2label(record.get("id2label"))
    else:
        obj = load_file(path, mmap=True)
        names = obj.get("class_names") if isinstance(obj, dict) else None
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None


def _id2label(id2label: Any) -> list[str] | None:
    """transformers' {"0": name, ...} as names by label; None unless it covers 0..n-1 with
    names other than its LABEL_i placeholders."""
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_index = {int(k): v for k, v in id2label.items()}
    except ValueError:
        return None
    names = [by_index.get(i) for i in range(len(by_index))]
    if None in names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def export(checkpoint: str, out: str, *, format: ExportFormat | None = None) -> str:
    """Write the consolidated fp32 weights of `checkpoint` (a step-N folder, a checkpoints
    folder or a run folder: the newest intact checkpoint) to `out`, in `format`
    (`default_format(out)` when None): a folder of model.safetensors and config.json, or
    one pickled file. Returns the checkpoint folder used."""
    format = format or default_format(out)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r} unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "safetensors" and (out.endswith(SAFETENSORS_SUFFIX) or os.path.isfile(out)):
        raise ValueError(
            f"--out {out}: the safetensors export is a folder ({WEIGHTS_FILES[0]} and {MODEL_CONFIG} go into "
            f"it): give a folder, or --format torch for one pickled file"
        )
    path = find_checkpoint(checkpoint)
    state, client = consolidate_checked(path)
    config = client.get("config", {})
    step = client.get("train_state", {}).get("step", step_of(path))
    names = client.get("class_names")
    if format == "torch":
        _atomic(out, lambda tmp: torch.save(
            {"model": state, "config": config, "step": step, "class_names": names}, tmp))
    else:
        os.makedirs(out, exist_ok=True)
        # The weights first, the record last: a folder whose config.json names this step
        # holds this step's weights.
        weights = os.path.join(out, WEIGHTS_FILES[0])
        _atomic(weights, lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}))
        write_json(os.path.join(out, MODEL_CONFIG), {
            "format": EXPORT_RECORD, "step": step, "config": config, "class_names": names})
    n = sum(v.numel() for v in state.values())
    logger.info(
        "exported %s (%d tensors, %.1fM parameters, fp32) to %s (%s)", path, len(state), n / 1e6, out, format
    )
    return path


def _atomic(target: str, write) -> None:
    """`write(tmp)` into a temporary file beside `target`, then renamed over it: readers see
    the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
