"""Checkpoint folders count only once complete; resume picks the newest complete one."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from marscale.engine import checkpointing as ckpt


def make_checkpoint(root, step: int, complete: bool = True, payload: bytes = b"weights") -> str:
    path = os.path.join(root, ckpt.tag_for(step))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(payload)
    if complete:
        ckpt.mark_complete(path, {"step": step})
    return path


def test_tag_round_trip():
    assert ckpt.tag_for(1200) == "step-1200"
    assert ckpt.step_of("/x/checkpoints/step-1200") == 1200
    assert ckpt.step_of("/x/checkpoints/step-1200/") == 1200
    for name in ("latest", "step-", "step-12a", "global_step12", "zero_to_fp32.py"):
        assert ckpt.step_of(name) is None


def test_latest_ignores_incomplete_and_foreign_entries(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, 10)
    make_checkpoint(root, 30)
    make_checkpoint(root, 40, complete=False)  # the job died while saving step 40
    (tmp_path / "zero_to_fp32.py").write_text("")
    (tmp_path / "step-99").write_text("not a folder")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [10, 30]
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=False)] == [40]
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [10, 30, 40]
    assert ckpt.latest_checkpoint(root) == os.path.join(root, "step-30")
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None


def test_resolve_resume(tmp_path):
    run = str(tmp_path / "run")
    root = ckpt.checkpoints_root(run)
    assert ckpt.resolve_resume("", run) is None
    assert ckpt.resolve_resume("auto", run) is None  # first start of a requeued job
    make_checkpoint(root, 5)
    make_checkpoint(root, 7, complete=False)
    assert ckpt.resolve_resume("auto", run) == os.path.join(root, "step-5")
    # An explicit path: a step folder, the checkpoints folder or the run folder.
    assert ckpt.resolve_resume(os.path.join(root, "step-5"), "elsewhere") == os.path.join(root, "step-5")
    assert ckpt.resolve_resume(root, "elsewhere") == os.path.join(root, "step-5")
    assert ckpt.resolve_resume(run, "elsewhere") == os.path.join(root, "step-5")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve_resume(os.path.join(root, "step-7"), run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), run)
    with pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.find_checkpoint(str(tmp_path))


def test_prune_keeps_newest_complete_and_newer_incomplete(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        make_checkpoint(root, step)
    make_checkpoint(root, 0, complete=False)  # an old crash leftover: removed
    make_checkpoint(root, 9, complete=False)  # newer than every complete one: kept
    deleted = ckpt.prune(root, keep_last=2)
    assert sorted(ckpt.step_of(d) for d in deleted) == [0, 1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [3, 4, 9]
    assert ckpt.prune(root, keep_last=0) == []  # keep all


def test_marker_is_written_atomically(tmp_path):
    path = make_checkpoint(str(tmp_path), 3, complete=False)
    assert not ckpt.is_complete(path)
    ckpt.mark_complete(path, {"step": 3, "world_size": 2})
    assert ckpt.is_complete(path)
    assert json.loads(open(os.path.join(path, ckpt.COMPLETE_MARKER)).read()) == {"step": 3, "world_size": 2}
    assert sorted(os.listdir(path)) == [ckpt.COMPLETE_MARKER, "mp_rank_00_model_states.pt"]  # no temp files


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file per save, or dies half-way."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, save_latest))
        path = os.path.join(save_dir, tag)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"partial" if self.fail else json.dumps(client_state).encode())
        if self.fail:
            raise KeyboardInterrupt("killed while saving")


def test_save_marks_complete_prunes_and_survives_a_crash(tmp_path):
    root = str(tmp_path / "checkpoints")
    engine = FakeEngine()
    for step in (10, 20, 30):
        path = ckpt.save_checkpoint(engine, root, step, {"step": step}, keep_last=2)
        assert ckpt.is_complete(path)
        assert os.path.isfile(ckpt.rng_state_file(path, 0))
    assert engine.calls[-1] == ("step-30", False)  # DeepSpeed's own `latest` is never written
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [20, 30]

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeEngine(fail=True), root, 40, {"step": 40}, keep_last=2)
    assert not ckpt.is_complete(os.path.join(root, "step-40"))
    assert ckpt.resolve_resume("auto", str(tmp_path)) == os.path.join(root, "step-30")

    # Saving the same step again (after resuming from step 30) replaces the leftover.
    path = ckpt.save_checkpoint(engine, root, 40, {"step": 40}, keep_last=2)
    assert ckpt.is_complete(path)
    assert open(os.path.join(path, "mp_rank_00_model_states.pt"), "rb").read() == b'{"step": 40}'
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [30, 40]


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = str(tmp_path)
    torch.save(ckpt.capture_rng_state(), ckpt.rng_state_file(path, 0))
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert ckpt.load_rng_state(path, 0)
    got = (random.random(), np.random.rand(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    assert not ckpt.load_rng_state(path, 1)  # a rank the checkpoint did not have
