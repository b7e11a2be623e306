"""Checkpoint folders count only once complete and load only when intact; resume picks
the newest intact one; RNG state round-trips through weights_only files."""

from __future__ import annotations

import errno
import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from marscale import cli
from marscale.checkpoints import folders as ckpt
from marscale.checkpoints import integrity
from marscale.checkpoints import rng_state


def make_checkpoint(root, step: int, complete: bool = True, checksums: bool = True) -> str:
    """A step-N folder with a small model states file; complete: with its marker (listing
    sizes and sha256 unless checksums=False, the marker of older checkpoints)."""
    path = os.path.join(root, ckpt.tag_for(step))
    os.makedirs(path, exist_ok=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}}, os.path.join(path, "mp_rank_00_model_states.pt"))
    if complete:
        info = {"step": step}
        if checksums:
            info["files"] = integrity.file_records(path)
        ckpt.mark_complete(path, info)
    return path


def truncate(file: str, keep: int = 100) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep)


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


def test_marker_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    path = make_checkpoint(str(tmp_path), 3, complete=False)
    os.makedirs(os.path.join(path, "offloaded_tensors", "rank0"))
    torch.save(torch.zeros(3), os.path.join(path, "offloaded_tensors", "rank0", "t.pt"))
    records = integrity.file_records(path)
    assert sorted(records) == ["mp_rank_00_model_states.pt", os.path.join("offloaded_tensors", "rank0", "t.pt")]
    for name, record in records.items():
        data = open(os.path.join(path, name), "rb").read()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_damaged_checkpoint_is_named_and_skipped(tmp_path, caplog):
    """A truncated or changed file of a COMPLETE checkpoint: an explicit step-N folder is an
    error naming the file; a checkpoints or run folder falls back to the previous one."""
    run = str(tmp_path / "run")
    root = ckpt.checkpoints_root(run)
    make_checkpoint(root, 1)
    good = make_checkpoint(root, 2)
    bad = make_checkpoint(root, 3)
    states = os.path.join(bad, "mp_rank_00_model_states.pt")
    truncate(states)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"mp_rank_00_model_states\.pt' has 100 bytes, \d+ when"):
        ckpt.find_checkpoint(bad)
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        assert ckpt.find_checkpoint(run) == good
    assert states in caplog.text and "previous complete checkpoint" in caplog.text
    assert ckpt.is_complete(bad)  # eval and export only read: nothing is renamed

    # Same size, other bytes: the sha256 tells.
    data = bytearray(open(os.path.join(good, "mp_rank_00_model_states.pt"), "rb").read())
    data[-30] ^= 0xFF
    open(os.path.join(good, "mp_rank_00_model_states.pt"), "wb").write(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="another sha256"):
        ckpt.find_checkpoint(good)
    assert ckpt.find_checkpoint(root).endswith("step-1")
    os.unlink(os.path.join(root, "step-1", "mp_rank_00_model_states.pt"))
    none_left = r"no intact checkpoint .*step-3: .*step-2: .*step-1: .*is missing"
    with pytest.raises(ckpt.CorruptCheckpointError, match=none_left):
        ckpt.find_checkpoint(run)


def test_resume_marks_damaged_checkpoints_only_when_one_is_intact(tmp_path):
    """Resuming from the run's own checkpoints renames a damaged one's marker to DAMAGED,
    so pruning (keep_last) cannot keep it in place of the new good ones; with no intact
    checkpoint at all, nothing is renamed (the next resume must stop again, not start
    from scratch)."""
    run = str(tmp_path / "run")
    root = ckpt.checkpoints_root(run)
    make_checkpoint(root, 1)
    bad = make_checkpoint(root, 2)
    truncate(os.path.join(bad, "mp_rank_00_model_states.pt"))
    assert ckpt.resolve_resume("auto", run) == os.path.join(root, "step-1")
    assert not ckpt.is_complete(bad)
    assert "has 100 bytes" in json.load(open(os.path.join(bad, integrity.DAMAGED_MARKER)))["reason"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1]

    truncate(os.path.join(root, "step-1", "mp_rank_00_model_states.pt"))
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint"):
        ckpt.resolve_resume("auto", run)
    assert ckpt.is_complete(os.path.join(root, "step-1"))


def test_checkpoint_without_checksums_still_loads_with_a_note(tmp_path, caplog):
    root = str(tmp_path)
    old = make_checkpoint(root, 4, checksums=False)
    with caplog.at_level(logging.INFO, logger=integrity.logger.name):
        assert ckpt.find_checkpoint(root) == old
    assert "before checkpoints recorded checksums" in caplog.text
    truncate(os.path.join(old, "mp_rank_00_model_states.pt"))  # still caught: unreadable
    with pytest.raises(ckpt.CorruptCheckpointError, match="truncated or corrupt"):
        ckpt.find_checkpoint(old)


def test_same_model_check_names_the_settings(tmp_path):
    path = make_checkpoint(str(tmp_path), 1, complete=False)
    stored = {"model": {"variant": "vit_tiny", "drop_path": 0.1, "bridge": {"depth": 2, "init": "xavier"}},
              "clip": {"tubelet_size": 2, "num_frames": 16}}
    torch.save({"module": {}, "marscale": {"config": stored}}, os.path.join(path, "mp_rank_00_model_states.pt"))
    # Regularisation, the initialisation and the clip length may change on resume.
    free = {"model": {"variant": "vit_tiny", "drop_path": 0.3, "bridge": {"depth": 2, "init": "trunc_normal"}},
            "clip": {"tubelet_size": 2, "num_frames": 8}}
    integrity.check_same_model(path, free)
    other = {"model": {"variant": "vit_s", "drop_path": 0.1, "bridge": {"depth": 1, "init": "xavier"}},
             "clip": {"tubelet_size": 4, "num_frames": 16}}
    with pytest.raises(integrity.ModelMismatchError) as err:
        integrity.check_same_model(path, other)
    message = str(err.value)
    assert "\n" not in message
    for expected in ("clip.tubelet_size is 2 there, 4 now", "model.bridge.depth is 2 there, 1 now",
                     "model.variant is 'vit_tiny' there, 'vit_s' now"):
        assert expected in message


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file per save, or dies half-way (`fail`:
    the exception to raise after writing part of it)."""

    def __init__(self, fail: BaseException | None = None):
        self.fail = fail
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, save_latest))
        path = os.path.join(save_dir, tag)
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "mp_rank_00_model_states.pt")
        if self.fail:
            open(file, "wb").write(b"partial")
            raise self.fail
        torch.save({"marscale": client_state}, file)


def test_save_marks_complete_prunes_and_survives_a_crash(tmp_path):
    root = str(tmp_path / "checkpoints")
    engine = FakeEngine()
    for step in (10, 20, 30):
        path = ckpt.save_checkpoint(engine, root, step, {"step": step}, keep_last=2)
        assert ckpt.is_complete(path)
        assert os.path.isfile(rng_state.rng_state_file(path, 0))
    assert engine.calls[-1] == ("step-30", False)  # DeepSpeed's own `latest` is never written
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [20, 30]

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeEngine(fail=KeyboardInterrupt("killed while saving")), root, 40, {"step": 40},
                             keep_last=2)
    assert not ckpt.is_complete(os.path.join(root, "step-40"))
    assert ckpt.resolve_resume("auto", str(tmp_path)) == os.path.join(root, "step-30")

    # Saving the same step again (after resuming from step 30) replaces the leftover.
    path = ckpt.save_checkpoint(engine, root, 40, {"step": 40}, keep_last=2)
    assert ckpt.is_complete(path)
    assert integrity.read_model_states(path)["marscale"] == {"step": 40}
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [30, 40]


def test_disk_full_while_saving_names_the_space(tmp_path):
    """ENOSPC (simulated; tests/test_checkpoint_safety.py fills a real tmpfs): one line with
    the folder, the step and the size of a checkpoint; the unfinished folder goes, the
    previous checkpoint stays."""
    root = str(tmp_path / "checkpoints")
    previous = ckpt.save_checkpoint(FakeEngine(), root, 10, {"step": 10}, keep_last=1)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.NoSpaceLeft, match=rf"no space left on {root} while saving step 20 \(needs about "
                       r"[0-9.e-]+ GB, [0-9.e+-]+ GB free\).*step-10 is the newest complete checkpoint") as err:
        ckpt.save_checkpoint(FakeEngine(fail=full), root, 20, {"step": 20}, keep_last=1)
    assert cli._is_reported(err.value)  # `marscale train` ends with this one line
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [10]
    assert ckpt.find_checkpoint(root) == previous
    # Other errors pass through unchanged.
    with pytest.raises(RuntimeError, match="^boom$"):
        ckpt.save_checkpoint(FakeEngine(fail=RuntimeError("boom")), root, 20, {"step": 20}, keep_last=1)


@pytest.mark.parametrize("legacy", [False, True])
def test_rng_state_round_trip(tmp_path, legacy):
    """Bit-exact, from a file that loads with weights_only=True; legacy: the tuples earlier
    checkpoints stored (numpy arrays inside) still restore."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # a cached gaussian in both states
    path = str(tmp_path)
    state = rng_state.capture_rng_state()
    if legacy:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    else:
        torch.load(_save(state, tmp_path / "check.pt"), weights_only=True)  # plain values only
    torch.save(state, rng_state.rng_state_file(path, 0))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert rng_state.load_rng_state(path, 0)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and got[3] == expected[3]
    np.testing.assert_array_equal(got[2], expected[2])
    torch.testing.assert_close(got[4], expected[4], rtol=0, atol=0)
    assert not rng_state.load_rng_state(path, 1)  # a rank the checkpoint did not have


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)
