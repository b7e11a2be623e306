"""The wheel carries what an installed marscale needs outside Python modules: the presets
(`marscale train --config NAME`, `marscale demo` from a wheel, not only a checkout)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def test_wheel_holds_every_preset(tmp_path):
    src = tmp_path / "src"
    # A copy, so the build leaves nothing in the checkout.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "build", "*.egg-info"),
                    symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "marscale-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "marscale", "configs", "*.yaml")))
    assert "demo.yaml" in presets and "_base.yaml" in presets
    assert {f"marscale/configs/{name}" for name in presets} <= names
    assert "marscale/commands/demo.py" in names and "shards_tools/cli.py" in names
