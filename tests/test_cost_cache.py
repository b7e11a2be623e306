"""marscale.cost.cache: counts written to disk are read back by a new count, and only
under the fingerprint of the code and torch that counted them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from marscale.cost import cache as cost_cache
from marscale.cost import counting as cost
from marscale.core.clip import ClipConfig
from marscale.model import ModelConfig

CFG = ModelConfig(num_classes=7, arch="mar", variant="vit_tiny")
CLIP = ClipConfig(img_size=64, num_frames=4)


@pytest.fixture(autouse=True)
def fresh_counts():
    """No count carried over in memory from another test, or left behind for one."""
    cost._count.cache_clear()
    yield
    cost._count.cache_clear()


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MARSCALE_CACHE_DIR", str(tmp_path))
    first = cost.count_model(CFG, CLIP, 0.5)
    stored = json.loads((tmp_path / "flop_counts.json").read_text())
    assert stored["fingerprint"] == cost_cache.fingerprint() and len(stored["counts"]) == 1
    cost._count.cache_clear()

    def no_recount(key):
        raise AssertionError("counted again instead of reading the disk cache")

    with monkeypatch.context() as mp:
        mp.setattr(cost, "_count_on_meta", no_recount)
        assert cost.count_model(CFG, CLIP, 0.5) == first  # read back from disk
    # Counts written under another fingerprint (older code or torch) are not used.
    stored["fingerprint"] = "stale"
    (tmp_path / "flop_counts.json").write_text(json.dumps(stored))
    assert cost_cache.read(tmp_path / "flop_counts.json") == {}


def test_empty_cache_dir_switches_the_disk_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MARSCALE_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    assert cost_cache.cache_file() is None
    cost.count_model(CFG, CLIP, 0.5)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("MARSCALE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cost_cache.cache_file() == tmp_path / "marscale" / "flop_counts.json"


def test_fingerprint_covers_every_package_source(tmp_path, monkeypatch):
    # Counting reads modules beyond marscale/model (losses, cost, configs); hashing the
    # whole package keeps a count from outliving an edit to any of them.
    package = tmp_path / "marscale"
    shutil.copytree(Path(cost_cache.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cost_cache, "__file__", str(package / "cost" / "cache.py"))
    before = cost_cache.fingerprint.__wrapped__()
    assert before == cost_cache.fingerprint()  # the copy hashes like the package itself
    for edited in ("cost/counting.py", "cost/table.py", "model/encoder.py"):
        with open(package / edited, "a") as f:
            f.write("\n# edited\n")
        after = cost_cache.fingerprint.__wrapped__()
        assert after != before, edited
        before = after
