"""Tests for marscale.weights.export's two forms: `marscale export` writes a folder of
model.safetensors and config.json by default, the single pickled file when asked (or for an
--out ending in .pt/.pth); load_pretrained and `exported_config` read both.

The checkpoint is a ZeRO-0 step folder written here (the module weights of a seeded tiny
MAR model and the config), which `export` consolidates like any DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import safetensors
import torch
from helpers import tiny_clip, tiny_model_config

from marscale import cli
from marscale.checkpoints import folders as ckpt
from marscale.checkpoints import integrity
from marscale.model import build_model
from marscale.weights.export import export, exported_config, stored_class_names
from marscale.weights.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

STEP = 7
NAMES = ["abseiling", "air drumming", "answering questions", "applauding"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete step-7 folder holding a seeded tiny MAR model and its config."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = tiny_model_config()
    state = build_model(cfg, tiny_clip()).state_dict()
    config = {"model": {"variant": cfg.variant, "num_classes": cfg.num_classes}}
    step = os.path.join(ckpt.checkpoints_root(str(root)), ckpt.tag_for(STEP))
    os.makedirs(step)
    client = {"config": config, "train_state": {"step": STEP}, "class_names": NAMES}
    torch.save({"module": state, "marscale": client},
               os.path.join(step, "mp_rank_00_model_states.pt"))
    ckpt.mark_complete(step, {"step": STEP, "files": integrity.file_records(step)})
    return types.SimpleNamespace(cfg=cfg, state=state, config=config, step=step, run=str(root))


def loads_back(checkpoint, path: str) -> None:
    model = build_model(checkpoint.cfg, tiny_clip())
    report = load_pretrained(model, path)
    assert report.layout == "marscale" and report.missing == [] and report.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, checkpoint.state[k]), k


def test_default_is_a_safetensors_folder_with_its_config(checkpoint, tmp_path):
    out = str(tmp_path / "exported")
    assert export(checkpoint.run, out) == checkpoint.step
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    record = json.load(open(os.path.join(out, "config.json")))
    assert record == {"format": "marscale", "step": STEP, "config": checkpoint.config, "class_names": NAMES}
    with safetensors.safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(checkpoint.state) and f.metadata() == {"format": "pt"}
    loads_back(checkpoint, out)
    loads_back(checkpoint, os.path.join(out, "model.safetensors"))  # the file alone
    assert exported_config(out) == exported_config(os.path.join(out, "model.safetensors")) == checkpoint.config


@pytest.mark.parametrize("how", ["suffix", "flag"])
def test_the_single_pickled_file_stays_selectable(checkpoint, tmp_path, how):
    out = str(tmp_path / ("model.pt" if how == "suffix" else "weights"))
    export(checkpoint.step, out, format=None if how == "suffix" else "torch")
    payload = torch.load(out, weights_only=True)
    assert payload["step"] == STEP and payload["config"] == checkpoint.config and payload["class_names"] == NAMES
    loads_back(checkpoint, out)
    assert exported_config(out) == checkpoint.config
    assert stored_class_names(out, None) == NAMES


def test_cli_format_flag_and_a_file_name_for_a_folder(checkpoint, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", checkpoint.run, "--out", str(tmp_path / "a.pt"),
                     "--format", "safetensors"]) == 0
    assert os.path.isfile(tmp_path / "a.pt" / "model.safetensors")  # asked for: a folder, whatever its name
    capsys.readouterr()  # the first export's log lines (logging may write to stderr)
    assert cli.main(["export", "--checkpoint", checkpoint.run, "--out", str(tmp_path / "m.safetensors")]) == 78
    err = capsys.readouterr().err.strip()
    assert err.startswith("marscale export: error: --out ") and "the safetensors export is a folder" in err
    assert "\n" not in err and not os.path.exists(tmp_path / "m.safetensors")


def test_a_folder_of_another_kind_stores_no_config(checkpoint, tmp_path):
    out = str(tmp_path / "exported")
    export(checkpoint.run, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": "videomae", "hidden_size": 192}, f)  # transformers' config
    assert exported_config(out) is None


def test_class_names_are_read_where_they_were_stored(checkpoint, tmp_path):
    assert stored_class_names(checkpoint.run, checkpoint.step) == NAMES  # the checkpoint's client state
    out = str(tmp_path / "exported")
    export(checkpoint.run, out)
    assert stored_class_names(out, None) == stored_class_names(os.path.join(out, "model.safetensors"), None) == NAMES
    # transformers' config.json: id2label (string keys, any order) unless it holds only placeholders.
    record = {"model_type": "videomae", "id2label": {"1": "b", "0": "a", "2": "c"}}
    json.dump(record, open(os.path.join(out, "config.json"), "w"))
    assert stored_class_names(out, None) == ["a", "b", "c"]
    for id2label in ({"0": "LABEL_0", "1": "LABEL_1"}, {"0": "a", "2": "c"}, {}):
        json.dump({**record, "id2label": id2label}, open(os.path.join(out, "config.json"), "w"))
        assert stored_class_names(out, None) is None, id2label
    # A checkpoint written before class names were stored: the export records none.
    old = tmp_path / "old"
    step = os.path.join(ckpt.checkpoints_root(str(old)), ckpt.tag_for(STEP))
    os.makedirs(step)
    torch.save({"module": checkpoint.state, "marscale": {"config": checkpoint.config, "train_state": {"step": STEP}}},
               os.path.join(step, "mp_rank_00_model_states.pt"))
    ckpt.mark_complete(step, {"step": STEP, "files": integrity.file_records(step)})
    export(str(old), str(tmp_path / "old_export"))
    assert json.load(open(tmp_path / "old_export" / "config.json"))["class_names"] is None
    assert stored_class_names(str(tmp_path / "old_export"), None) is None
