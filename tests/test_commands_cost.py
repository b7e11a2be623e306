"""marscale.commands.cost: `marscale cost` in every format, run through the console script's main."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest
from helpers import count_standard as count

from marscale.cli import main as cli_main
from marscale.commands.cost import claim_paragraph
from marscale.cost.table import ClaimTerm, CostRow


def run_cli(capsys, *args: str) -> str:
    assert cli_main(["cost", "--variants", "vit_tiny", "vit_b", "--ratios", "0,0.5", *args]) == 0
    return capsys.readouterr().out


def test_cli_csv(capsys):
    rows = list(csv.DictReader(io.StringIO(run_cli(capsys, "--format", "csv"))))
    assert len(rows) == 4
    assert list(rows[0]) == [f.name for f in dataclasses.fields(CostRow)]
    b50 = rows[3]
    assert (b50["variant"], b50["setting"]) == ("vit_b", "MAR 50%")
    assert int(b50["macs_view"]) == count("vit_b", 0.5).macs_inference


def test_cli_json(capsys):
    doc = json.loads(run_cli(capsys, "--format", "json"))
    assert [r["setting"] for r in doc["rows"]] == ["full", "MAR 50%"] * 2
    terms = doc["mar_vit_l_vs_vit_h"]
    per_view = terms["MAR 50% ViT-L / ViT-H, inference per view"]
    assert per_view == pytest.approx(count("vit_l", 0.5).macs_inference / count("vit_h", 0.0).macs_inference)


def test_cli_markdown_and_table(capsys):
    md = run_cli(capsys, "--format", "markdown").splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 4 and set(table[1]) <= set("|-")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "14.5%" in "\n".join(md)
    text = run_cli(capsys)
    assert "ViT-B" in text and "MAR 50%" in text and "Backward:" in text


def test_claim_paragraph_names_a_match_only_within_rounding():
    near = claim_paragraph([ClaimTerm("a", 0.1452), ClaimTerm("b", 0.30)])
    assert "a matches the claim (14.5%)." in near
    far = claim_paragraph([ClaimTerm("a", 0.11), ClaimTerm("b", 0.30)])
    assert "Closest: 11.0% (a)." in far and "none is reported as the paper's number" in far
