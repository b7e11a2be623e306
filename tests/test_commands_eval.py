"""marscale.commands.eval with --mask-ratios (marscale.commands.eval_ratios): one row per
ratio whose accuracy is that of a direct `evaluate()` at that eval_ratio, whose cost is
`marscale.cost.counting`'s count, written as Markdown, CSV, JSON and PNG; bad ratios stop before
anything is built. Weights of another model are refused in one line from every form they
come in (exported file or folder, run folder, step folder), with or without --mask-ratios.

configs/demo.yaml with 32x32 clips of 4 frames (2x2x2 = 8 tokens, so 2x2 cells take the
ratios 0, 0.25, 0.5, 0.75), 2 views per video, on the session's synthetic shards; the
weights are a seeded initialisation, saved as an exported file and as a ZeRO-0 run folder.
10 classes (the shards use 4) and seed 1: top-1 and top-5 then differ between the ratios,
so agreeing with the direct evaluation means something.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import types

import pytest
import torch
from helpers import DEMO_CONFIG, run_overrides

from marscale import cli
from marscale.core import dist
from marscale.core.clip import token_grid
from marscale.commands import eval_ratios
from marscale.core.config import to_dict
from marscale.cost.counting import count_model
from marscale.checkpoints import integrity
from marscale.checkpoints import folders as ckpt
from marscale.engine.config import load_train_config
from marscale.engine.evaluate import evaluate
from marscale.tokens.masking import MaskingConfig
from marscale.model import build_model
from marscale.data.shards import ShardSet

pytestmark = pytest.mark.usefixtures("single_thread")

RATIOS = (0.0, 0.25, 0.5, 0.75)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _weights(synthetic_shards, root, *overrides: str):
    """A seeded model of the tiny demo config as an exported file and as a run folder."""
    cfg = load_train_config(
        DEMO_CONFIG,
        [*run_overrides(synthetic_shards, root / "run"), "data.num_workers=0", "data.test_num_clips=2",
         "data.eval_batch_size=3", "model.num_classes=10", *overrides],
    )
    torch.manual_seed(1)
    state = build_model(cfg.model, cfg.clip).state_dict()
    file = str(root / "model.pt")
    torch.save({"model": state, "config": to_dict(cfg), "step": 1}, file)  # as `marscale export` writes
    step = os.path.join(ckpt.checkpoints_root(str(root / "run")), ckpt.tag_for(1))
    os.makedirs(step)
    states = {"module": state, "marscale": {"config": to_dict(cfg)}}  # ZeRO-0: the module weights
    torch.save(states, os.path.join(step, "mp_rank_00_model_states.pt"))
    ckpt.mark_complete(step, {"step": 1, "files": integrity.file_records(step)})
    return types.SimpleNamespace(cfg=cfg, state=state, file=file, run=str(root / "run"), step=step)


@pytest.fixture(scope="module")
def mar(synthetic_shards, tmp_path_factory):
    return _weights(synthetic_shards, tmp_path_factory.mktemp("mar"))


@pytest.fixture(scope="module")
def exported(mar, tmp_path_factory):
    """`marscale export`'s default form of the run: model.safetensors and config.json."""
    from marscale.weights.export import export

    out = str(tmp_path_factory.mktemp("exported") / "model")
    export(mar.run, out)
    return out


def direct(weights, masking: MaskingConfig):
    """`evaluate()` of the weights with `masking`, called directly (fp32, on the device the
    command uses)."""
    cfg = weights.cfg
    device = dist.resolve_device(cfg.run.device)
    model = build_model(cfg.model, cfg.clip)
    model.load_state_dict(weights.state)
    model.to(device).eval()
    return evaluate(
        lambda x, tokens: model(x, tokens)["logits"], cfg.data, cfg.clip, masking, ShardSet.load(cfg.data.val_shards),
        token_grid(cfg.clip, cfg.model.patch_size), cfg.model.num_classes, device=device, dtype=torch.float32,
    )


def run_eval(capsys, checkpoint: str, ratios: str, *args: str) -> str:
    assert cli.main(["eval", "--checkpoint", checkpoint, "--mask-ratios", ratios, *args]) == 0
    return capsys.readouterr().out


def read_outputs(out_dir) -> tuple[list[dict], dict, str]:
    base = os.path.join(out_dir, eval_ratios.FILE_STEM)
    with open(base + ".png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with open(base + ".csv") as f:
        rows = list(csv.DictReader(f))
    with open(base + ".json") as f:
        doc = json.load(f)
    with open(base + ".md") as f:
        markdown = f.read()
    return rows, doc, markdown


def test_one_row_per_ratio_with_its_cost_and_the_accuracy_of_a_direct_evaluation(mar, tmp_path, capsys):
    out_dir = tmp_path / "table"
    shown = run_eval(capsys, mar.file, ",".join(map(str, RATIOS)), "--out-dir", str(out_dir))
    rows, doc, markdown = read_outputs(out_dir)

    assert [float(r["mask_ratio"]) for r in rows] == list(RATIOS)
    assert [int(r["visible_tokens"]) for r in rows] == [8, 6, 4, 2]
    macs = [int(r["macs_view"]) for r in rows]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)
    full = count_model(mar.cfg.model, mar.cfg.clip, 0.0).macs_inference
    assert len({(r["top1"], r["top5"]) for r in rows}) > 1  # the ratios score differently
    for row, ratio in zip(rows, RATIOS):
        counted = count_model(mar.cfg.model, mar.cfg.clip, ratio).macs_inference
        assert int(row["macs_view"]) == counted
        assert float(row["view_vs_full"]) == pytest.approx(counted / full)
        expected = direct(mar, dataclasses.replace(mar.cfg.masking, eval_ratio=ratio))
        assert (float(row["top1"]), float(row["top5"])) == (expected.top1, expected.top5)
        # 8 videos x 2 views in batches of 3: the first batch (3 views) is the warm-up.
        assert int(row["num_views"]) == 16 and int(row["timed_views"]) == 13
        assert row["warmup_excluded"] == "True" and float(row["clips_per_s"]) > 0

    assert doc["checkpoint"] == os.path.abspath(mar.file) and doc["checkpoint_folder"] is None
    assert doc["torch"] == torch.__version__ and doc["device"] == str(dist.resolve_device(mar.cfg.run.device))
    assert doc["config"]["model"]["variant"] == "vit_tiny"
    assert [r["mask_ratio"] for r in doc["ratios"]] == list(RATIOS)
    for record, row in zip(doc["ratios"], rows):
        assert record["top1"] == float(row["top1"]) and record["masking"]["eval_ratio"] == record["mask_ratio"]
        assert record["expected_videos"] == record["num_videos"] == 8 and "skipped_samples" in record
    assert doc["config"]["masking"]["ratio"] == 0.5 and "eval_ratio" not in doc["config"]["masking"]

    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(RATIOS) and "GFLOPs/view (MACs)" in table[0]
    assert table[2].startswith("| 0 | 8/8 |") and table[-1].startswith("| 0.75 | 2/8 |")
    assert "multiply-accumulates" in markdown and "warm-up" in markdown
    assert markdown in shown  # the screen shows the same Markdown


def test_run_folder_writes_next_to_the_run(mar, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default for a folder does not depend on where it runs
    run_eval(capsys, mar.run, "0.5,0")
    rows, doc, _ = read_outputs(os.path.join(mar.run, "eval_ratios"))
    assert doc["checkpoint_folder"] == mar.step
    assert [(float(r["mask_ratio"]), int(r["visible_tokens"])) for r in rows] == [(0.5, 4), (0.0, 8)]
    half = direct(mar, dataclasses.replace(mar.cfg.masking, eval_ratio=0.5))
    assert float(rows[0]["top1"]) == half.top1
    assert not os.path.exists(tmp_path / "eval_ratios")


def test_full_token_model_is_masked_with_cell_running_and_says_so(synthetic_shards, tmp_path, capsys, monkeypatch):
    vit = _weights(synthetic_shards, tmp_path, "model.arch=vit", "masking.kind=none")
    monkeypatch.chdir(tmp_path)
    shown = run_eval(capsys, vit.file, "0,0.5")
    rows, doc, _ = read_outputs(tmp_path / "eval_ratios")  # a file's default: ./eval_ratios
    assert "cell running masking in 2x2 cells" in shown and "masking.kind is none" in shown
    assert [r["masking"]["kind"] for r in doc["ratios"]] == ["none", "cell_running"]
    assert doc["ratios"][1]["masking"]["cell"] == [2, 2]
    assert [int(r["visible_tokens"]) for r in rows] == [8, 4]
    masked = direct(vit, MaskingConfig(kind="cell_running", ratio=0.5, eval_ratio=0.5))
    assert float(rows[1]["top1"]) == masked.top1
    assert float(rows[0]["top1"]) == direct(vit, vit.cfg.masking).top1
    assert int(rows[1]["macs_view"]) == count_model(vit.cfg.model, vit.cfg.clip, 0.5).macs_inference


def test_a_model_trained_with_several_ratios_needs_no_evaluation_ratio(mar, tmp_path, capsys):
    """masking.ratio drawn from a set names no evaluation ratio; the dial sets one per pass."""
    stored = to_dict(mar.cfg)
    stored["masking"].update(ratio=[0.25, 0.5, 0.75], eval_ratio=None)
    file = str(tmp_path / "per_clip.pt")
    torch.save({"model": mar.state, "config": stored, "step": 1}, file)
    run_eval(capsys, file, "0.25,0.75", "--out-dir", str(tmp_path / "t"))
    rows, doc, _ = read_outputs(tmp_path / "t")
    assert doc["config"]["masking"]["ratio"] == [0.25, 0.5, 0.75]
    assert [int(r["visible_tokens"]) for r in rows] == [6, 2]
    for row, ratio in zip(rows, (0.25, 0.75)):
        assert float(row["top1"]) == direct(mar, dataclasses.replace(mar.cfg.masking, eval_ratio=ratio)).top1


def test_complementary_pass_is_counted_in_the_cost(synthetic_shards, tmp_path, capsys):
    both = _weights(synthetic_shards, tmp_path, "masking.eval_complement=true")
    shown = run_eval(capsys, both.file, "0,0.25", "--out-dir", str(tmp_path / "t"))
    rows, _, _ = read_outputs(tmp_path / "t")
    model, clip = both.cfg.model, both.cfg.clip
    assert int(rows[0]["macs_view"]) == count_model(model, clip, 0.0).macs_inference  # no mask: one pass
    # 6 tokens visible, then the complement's 2
    assert int(rows[1]["macs_view"]) == count_model(model, clip, 0.25).macs_inference + count_model(
        model, clip, 0.75
    ).macs_inference
    masking = dataclasses.replace(both.cfg.masking, eval_ratio=0.25)
    assert float(rows[1]["top1"]) == direct(both, masking).top1
    assert int(rows[1]["timed_views"]) == 13  # the warm-up is the first batch with its complementary pass
    assert "GFLOPs/view counts both passes" in shown


@pytest.mark.parametrize(
    "ratios,named",
    [("0,0.3", "ratio 0.3"), ("0.5,1.0", "ratio 1.0"), ("0,-0.25", "ratio -0.25"), ("0.5,half", "'half'"),
     ("0.5,0.5", "0.5 is listed twice")],
)
def test_a_bad_ratio_stops_before_anything_is_built(mar, tmp_path, capsys, monkeypatch, ratios, named):
    import marscale.model

    monkeypatch.delenv("MARSCALE_TRACEBACK", raising=False)

    def build_model(*args, **kw):
        raise AssertionError("a model was built")

    monkeypatch.setattr(marscale.model, "build_model", build_model)
    args = ["eval", "--checkpoint", mar.file, "--mask-ratios", ratios, "--out-dir", str(tmp_path / "t")]
    assert cli.main(args) == 78
    err = capsys.readouterr().err
    assert err.startswith("marscale eval: error: --mask-ratios") and named in err
    assert not os.path.exists(tmp_path / "t")


def test_out_dir_and_out_belong_to_their_own_mode(mar, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", mar.file, "--out-dir", str(tmp_path)]) == 78
    assert "pass --mask-ratios too" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", mar.file, "--mask-ratios", "0", "--out", str(tmp_path / "e.json")]) == 78
    assert "--out-dir" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_give_the_table_of_one_and_only_the_main_rank_writes(mar, tmp_path):
    import subprocess

    from helpers import REPO, subprocess_env

    from marscale.core.dist import free_port

    out_dir = tmp_path / "two_ranks"
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "marscale.cli", "eval",
         "--checkpoint", mar.run, "--mask-ratios", "0,0.5,0.75", "--out-dir", str(out_dir),
         "--set", "data.batch_size=4"],  # an epoch must be an optimizer step on 2 ranks (pre-flight)
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("# Accuracy against compute") == 1  # printed by the main rank only
    rows, doc, _ = read_outputs(out_dir)
    assert doc["world_size"] == 2
    for row, ratio in zip(rows, (0.0, 0.5, 0.75)):
        expected = direct(mar, dataclasses.replace(mar.cfg.masking, eval_ratio=ratio))
        assert (float(row["top1"]), float(row["top5"])) == (expected.top1, expected.top5)
        assert int(row["num_views"]) == 16 and int(row["timed_views"]) == 16 - 2 * 3  # a warm-up batch per rank
    assert [p.name for p in out_dir.iterdir() if p.name.endswith(".partial")] == []


# --- weights of another model -----------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "exported", "run", "step"])
@pytest.mark.parametrize(
    "setting,line",
    [
        ("model.variant=vit_s", r"does not fit the model: .* To fit it, set model\.variant=vit_tiny \(the checkpoint's "
                                r"encoder has 6 blocks 192 wide, the model's 12 blocks 384 wide\)\.$"),
        ("model.num_classes=7", r"holds a classifier for 10 classes, the model has 7: set model\.num_classes=10$"),
    ],
)
def test_another_model_is_refused_in_one_line_from_every_form(mar, exported, tmp_path, capsys, monkeypatch, form,
                                                              setting, line):
    import re

    monkeypatch.delenv("MARSCALE_TRACEBACK", raising=False)
    checkpoint = {"file": mar.file, "exported": exported, "run": mar.run, "step": mar.step}[form]
    for dial in ([], ["--mask-ratios", "0,0.5", "--out-dir", str(tmp_path / "t")]):
        assert cli.main(["eval", "--checkpoint", checkpoint, "--set", setting, *dial]) == 78
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("marscale eval: error: ") and re.search(line, err.strip()), err
    assert not os.path.exists(tmp_path / "t")


def test_the_exported_folder_evaluates_as_the_weights(mar, exported, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", exported, "--out", str(out)]) == 0  # its config.json's config
    result = json.load(open(out))
    expected = direct(mar, mar.cfg.masking)
    assert (result["top1"], result["top5"], result["num_views"]) == (expected.top1, expected.top5, expected.num_views)
