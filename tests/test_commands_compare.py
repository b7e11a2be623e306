"""marscale.commands.compare / marscale.cost.compare: `marscale compare --quick` end to end
(DeepSpeed on the CPU, every output file), counted ratios against marscale.cost.counting, and the
lines set beside the paper's figures."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

from marscale.cost import compare
from marscale.cli import main as cli_main
from marscale.commands.compare import QUICK_ENTRIES, QUICK_OVERRIDES
from marscale.cost.counting import count_model
from marscale.engine.phases import PHASES

MEASURED = ("train_clips_per_s", "infer_clips_per_s", "peak_memory_gib", "achieved_tflops", "train_step_median_s")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`marscale compare --quick --format json --out DIR` in a child process (one DeepSpeed start)."""
    out = tmp_path_factory.mktemp("compare")
    proc = subprocess.run(
        [sys.executable, "-m", "marscale.cli", "compare", "--quick", "--format", "json", "--out", str(out)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out


@pytest.mark.slow
def test_quick_json_counts_and_measures(quick_run):
    doc, _ = quick_run
    rows = {r["entry"]: r for r in doc["rows"]}
    assert list(rows) == list(QUICK_ENTRIES) and doc["reference"] == QUICK_ENTRIES[0]
    ref = rows[QUICK_ENTRIES[0]]
    assert all(ref[f"ratio_{k}"] == 1.0 for k in compare.RATIO_TERMS)
    for entry, row in rows.items():
        cfg = compare.Entry.parse(entry).load(QUICK_OVERRIDES)
        counted = count_model(cfg.model, cfg.clip, cfg.masking.ratio_at(train=True))
        full = count_model(compare.Entry.parse(QUICK_ENTRIES[0]).load(QUICK_OVERRIDES).model, cfg.clip, 0.0)
        assert row["macs_view"] == counted.macs_inference and row["macs_train_clip"] == counted.macs_training
        assert row["ratio_view"] == pytest.approx(counted.macs_inference / full.macs_inference)
        assert row["ratio_train"] == pytest.approx(counted.macs_training / full.macs_training)
        assert all(row[k] > 0 for k in MEASURED), {k: row[k] for k in MEASURED}
        assert row["batch"] == 2 and row["timed_steps"] == 2 and row["clock"] == "cpu"
        assert row["mfu"] is None and row["mfu_peak_tflops"] is None  # a CPU: no MFU, and why
        assert row["mfu_peak"] == "no MFU: cpu has no peak in the table (set logging.peak_tflops)"
        assert row["device_hours"] == pytest.approx(
            row["train_step_median_s"] / 2 * row["schedule_clips"] / 3600)
        # The step by phase, each phase measured, inside the step on the same clock; the
        # counted forward and backward make up the counted training clip.
        for phases, step in zip(row["train_phase_steps_s"], row["train_step_s"]):
            assert list(phases) == list(PHASES) and all(v > 0 for v in phases.values())
            assert 0.8 * step <= sum(phases.values()) <= step
        assert all(row[f"train_{p}_median_s"] > 0 for p in PHASES)
        assert row["macs_train_forward"] == counted.macs_training_forward
        assert row["macs_train_forward"] + row["macs_train_backward"] == row["macs_train_clip"]
        assert row["trained_params"] == row["params_training"] == counted.params_training
        assert row["ratio_measured_forward"] == pytest.approx(
            row["train_forward_median_s"] / ref["train_forward_median_s"])
        assert row["ratio_measured_input"] == pytest.approx(
            (row["train_masks_median_s"] + row["train_data_median_s"])
            / (ref["train_masks_median_s"] + ref["train_data_median_s"]))
        assert row["ratio_optimizer_params"] == pytest.approx(row["params_training"] / ref["params_training"])
        assert row["checkpointing"] == "none" and row["grad_checkpointing"] == 0
    assert rows["demo"]["label"] == "MAR ViT-Ti 50%" and rows["demo"]["ratio_measured_train"] > 0
    assert doc["settings"].endswith("; no MFU: cpu has no peak in the table (set logging.peak_tflops)")


@pytest.mark.slow
def test_quick_writes_markdown_csv_and_png(quick_run):
    doc, out = quick_run
    with open(os.path.join(out, "compare.csv")) as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == list(doc["rows"][0]) and len(records) == 3
    md = open(os.path.join(out, "compare.md")).read()
    assert all(f"### {t}" in md for t in ("Counted", "Measured", "Training step by phase", "Ratios to ViT-Ti full",
                                          "Training step by phase, ratios to ViT-Ti full"))
    assert "not measured" not in md and "53%" in md
    table = [line for line in md.splitlines() if line.startswith("| ViT-Ti full")]
    assert len(table) == 5
    phases = md.split("### Training step by phase\n")[1].split("###")[0]
    assert "| forward ms | backward ms | optimizer ms |" in phases and "| 3.0 |" in phases  # optimizer params M
    with open(os.path.join(out, "compare.png"), "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_counted_only_sets_mar_vit_l_beside_the_paper(capsys):
    assert cli_main(["compare", "vit_h_k400", "mar_vit_l_k400", "--no-measure", "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "MAR ViT-L costs 14.5% of ViT-H" in text and "not measured (--no-measure)" in text
    # 276.0 / 1191.0 GFLOPs per view, as `marscale cost` prints
    assert "23.2%  MAR ViT-L 50% / ViT-H full: counted MACs per inference view" in text
    assert "None is 14.5%" in text


def test_entries_and_reference():
    e = compare.Entry.parse("mar_vit_l_k400:masking.ratio=0.75:deepspeed.zero_stage=3")
    assert (e.config, e.overrides) == ("mar_vit_l_k400", ("masking.ratio=0.75", "deepspeed.zero_stage=3"))
    cfg = e.load()
    assert compare.label(cfg) == "MAR ViT-L 75%" and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ValueError, match="reference 'vit_q'"):
        compare.find_reference([], "vit_q")


def test_paper_terms_pair_mar_with_full_of_its_size():
    rows = [compare.counted_row(compare.Entry.parse(e), compare.Entry.parse(e).load(), 240_000, {})
            for e in ("vit_l_k400", "mar_vit_l_k400")]
    compare.fill_ratios(rows, rows[0])
    (view, train) = compare.paper_terms(rows, rows[0])
    assert view.name == "MAR ViT-L 50% vs ViT-L full, inference per view, counted"
    assert view.value == pytest.approx(1 - rows[1].macs_view / rows[0].macs_view)
    assert round(view.value, 3) == 0.537  # docs/benchmarks.md: ViT-L 276.0 vs 596.8 GFLOPs
    assert rows[1].schedule_clips == 240_000 * 60 * 2


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--batch", "-4"), ("--steps", "0"),
                                         ("--warmup", "-1"), ("--threads", "0")])
def test_bad_counts_are_refused_before_measuring(capsys, flag, value):
    # `--batch 0` used to fall through `args.batch or 2` and measure at batch 2.
    with pytest.raises(SystemExit) as exc:
        cli_main(["compare", "--quick", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be an integer >= " in err and f"got {value}" in err


@pytest.mark.parametrize("policy, blocks", [("none", {"vit_h_k400": 0, "mar_vit_l_k400": 0}),
                                            ("all", {"vit_h_k400": 32, "mar_vit_l_k400": 24}),
                                            ("config", {"vit_h_k400": 32, "mar_vit_l_k400": 0})])
def test_one_recompute_policy_for_every_row_printed_in_each(capsys, policy, blocks):
    # The presets differ (ViT-H recomputes all 32 blocks, MAR ViT-L none): by default no row
    # recomputes, so a measured MAR ViT-L / ViT-H ratio holds no recomputation of one side.
    argv = ["compare", "vit_h_k400", "mar_vit_l_k400", "--no-measure"]
    argv += [] if policy == "none" else ["--checkpointing", policy]
    assert cli_main([*argv, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    got = {r["entry"]: (r["checkpointing"], r["grad_checkpointing"], r["encoder_depth"]) for r in doc["rows"]}
    assert got == {e: (policy, n, {"vit_h_k400": 32, "mar_vit_l_k400": 24}[e]) for e, n in blocks.items()}
    assert cli_main([*argv, "--format", "csv"]) == 0
    records = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [(r["checkpointing"], int(r["grad_checkpointing"])) for r in records] == [
        (policy, blocks["vit_h_k400"]), (policy, blocks["mar_vit_l_k400"])]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    measured = text.split("Measured:")[1].split("Ratios to")[0]
    assert f"ViT-H full             2/bf16  {blocks['vit_h_k400']}/32 blocks ({policy})" in measured
    assert f"{blocks['mar_vit_l_k400']}/24 blocks ({policy})" in measured
    ratios = text.split("Ratios to ViT-H full:")[1]
    assert f"{blocks['mar_vit_l_k400']}/24 vs {blocks['vit_h_k400']}/32 ({policy})" in ratios
    caption = compare.checkpointing_caption(
        [compare.counted_row(compare.Entry.parse(e), compare.apply_checkpointing(compare.Entry.parse(e).load(), policy),
                             240_000, {}, policy) for e in blocks])
    assert caption + "." in text
    assert caption == {
        "none": "activation recomputation: no encoder block recomputed, every row (--checkpointing none)",
        "all": "activation recomputation: every encoder block recomputed, every row (--checkpointing all)",
        "config": "activation recomputation: ViT-H full 32/32 blocks (config), MAR ViT-L 50% 0/24 blocks (config) "
                  "(a measured ratio of rows that recompute differently includes the recomputation)",
    }[policy]


def test_a_recompute_override_needs_the_config_policy(capsys):
    # Under `none` (the default) an entry's own model.grad_checkpointing would be replaced
    # silently: refused in one line; kept under --checkpointing config.
    argv = ["compare", "vit_b_k400:model.grad_checkpointing=4", "--reference", "vit_b_k400:model.grad_checkpointing=4",
            "--no-measure", "--format", "json"]
    assert cli_main(argv) == 78
    assert ("model.grad_checkpointing=4 is replaced by --checkpointing none (every row: no encoder block recomputed, "
            "every row); pass --checkpointing config") in capsys.readouterr().err
    assert cli_main([*argv, "--checkpointing", "config"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert (row["checkpointing"], row["grad_checkpointing"]) == ("config", 4)


def _fake_measurement(cfg, *, batch, warmup, steps, videos, tick):
    """A Measurement of made-up times (no engine built): the rows around a failing one."""
    from marscale.engine.measure import Measurement
    from marscale.engine.metrics import Peak

    step = {p: 0.01 for p in PHASES}
    return Measurement(device="CPU, 1 thread", batch=batch, warmup=warmup, steps=steps, train_step_s=(0.06,) * steps,
                       infer_step_s=(0.02,) * steps, clock="cpu", train_wall_s=(0.06,) * steps,
                       infer_wall_s=(0.02,) * steps, train_phase_s=(step,) * steps, trained_params=1,
                       peak_memory_bytes=2**30, flops_per_train_clip=10**9, peak=Peak(None, "no MFU: test"))


@pytest.mark.parametrize("raised", [RuntimeError("CUDA error: an illegal memory access was encountered\nmore"),
                                    KeyboardInterrupt()])
def test_a_failed_or_interrupted_measurement_keeps_the_other_rows(monkeypatch, tmp_path, capsys, raised):
    # Rows are measured cheapest first: MAR 75%, MAR 50%, full. The middle one raises.
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's import prints (the command imports it so too)
        import marscale.engine.measure

    def measure(cfg, **kw):
        if compare.label(cfg) == "MAR ViT-Ti 50%":
            raise raised
        return _fake_measurement(cfg, **kw)

    monkeypatch.setattr(marscale.engine.measure, "measure", measure)
    argv = ["compare", "--quick", "--format", "json", "--out", str(tmp_path)]
    if isinstance(raised, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            cli_main(argv)
    else:
        assert cli_main(argv) == 1  # outputs written, and the failure is the exit status
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert json.loads(capsys.readouterr().out) == doc
    rows = {r["entry"]: r for r in doc["rows"]}
    assert rows["demo:masking.ratio=0.75"]["train_step_median_s"] == 0.06
    failed = rows["demo"]
    assert failed["train_step_median_s"] is None
    if isinstance(raised, KeyboardInterrupt):
        assert doc["settings"].endswith("; interrupted (Ctrl-C)")
        assert failed["not_measured"] == rows[QUICK_ENTRIES[0]]["not_measured"] == "interrupted (Ctrl-C)"
        assert failed["error"] == ""
    else:
        assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert failed["not_measured"] == f"CPU: failed at batch 2: {failed['error']}"
        assert rows[QUICK_ENTRIES[0]]["train_step_median_s"] == 0.06  # measured after the failure
    with open(tmp_path / "compare.csv") as f:
        assert [r["error"] for r in csv.DictReader(f)] == [r["error"] for r in doc["rows"]]
