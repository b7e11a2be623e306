"""No code, no tracebacks and no lost checkpoints from what lies in a checkpoint folder:
a planted pickle never runs (resume, `marscale eval`, `marscale export`, DeepSpeed's own
loader), a file that is no checkpoint is one line, a truncated checkpoint is named and
skipped, another model size is one line, and a full disk says so.

One tiny ZeRO-2 fp32 trainer (configs/demo.yaml with 32x32 clips of 4 frames, resume=auto)
serves the module; each test saves the checkpoints it needs into its run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from test_engine_trainer import tiny_config

from marscale import cli
from marscale.core import dist
from marscale.core.config import to_dict
from marscale.checkpoints import folders as ckpt
from marscale.data.shards import ShardSet
from marscale.engine.trainer import Trainer

OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"
RNG_STATE = "rng_state_rank0.pt"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()


@pytest.fixture(scope="module")
def trainer(synthetic_shards, tmp_path_factory):
    cfg = tiny_config(
        synthetic_shards, tmp_path_factory.mktemp("run"), "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
        "checkpoint.resume=auto",
    )
    trainer = Trainer(cfg)
    yield trainer
    trainer.close()


def fresh_checkpoints(trainer: Trainer, *steps: int) -> list[str]:
    """The trainer's run holds exactly checkpoints `steps` (same weights, other step counts)."""
    shutil.rmtree(trainer.checkpoints_root, ignore_errors=True)
    paths = []
    for step in steps:
        trainer.state = ckpt.TrainState(step=step)
        paths.append(trainer.save())
    return paths


class Payload:
    """Unpickling it calls open(marker, "w"): the file appears if the pickle ran, in any process."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str, name: str, marker) -> None:
    """Add a Payload to file `name` of checkpoint `path`, and record the new file's size and
    sha256 in the COMPLETE marker too, if it lists them (whoever can write the folder can
    write its marker)."""
    file = os.path.join(path, name)
    obj = torch.load(file, map_location="cpu", weights_only=False)  # the test's own file
    obj["planted"] = Payload(marker)
    torch.save(obj, file)
    marker_file = os.path.join(path, ckpt.COMPLETE_MARKER)
    info = json.load(open(marker_file))
    if "files" in info:
        data = open(file, "rb").read()
        info["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        json.dump(info, open(marker_file, "w"))


def truncate(file: str, keep: int = 1000) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep)


def reported(err: str, command: str) -> str:
    """The one line `marscale COMMAND` ended with (no traceback before it)."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"marscale {command}: error: "), err
    return last


# --- 1. no code from checkpoint files -----------------------------------------------


@pytest.mark.parametrize("name", [RNG_STATE, MODEL_STATES, OPTIM_STATES])
def test_planted_code_does_not_run_on_resume(trainer, tmp_path, name):
    (path,) = fresh_checkpoints(trainer, 2)
    marker = tmp_path / "payload-ran"
    plant(path, name, marker)
    with pytest.raises(ValueError, match=rf"{name}' holds Python objects .* refused .*GLOBAL io\.open"):
        trainer.resume()
    assert not marker.exists()


def test_deepspeed_loader_refuses_code_without_the_folder_check(trainer, tmp_path):
    """DeepSpeed's loaders pass weights_only=False; under `weights_only_loads` they cannot
    run a pickle either (a file swapped after `find_checkpoint` checked the folder)."""
    (path,) = fresh_checkpoints(trainer, 2)
    marker = tmp_path / "payload-ran"
    plant(path, OPTIM_STATES, marker)
    with pytest.raises(ValueError, match=r"outside DeepSpeed's allow-list.*GLOBAL io\.open"):
        ckpt.load_checkpoint(trainer.engine, path)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the scope ended with the load


@pytest.mark.parametrize("command", ["eval", "export"])
def test_planted_code_does_not_run_in_eval_or_export(trainer, tmp_path, capsys, command):
    (path,) = fresh_checkpoints(trainer, 2)
    marker = tmp_path / "payload-ran"
    plant(path, MODEL_STATES, marker)
    out = ["--out", str(tmp_path / "model.pt")] if command == "export" else []
    assert cli.main([command, "--checkpoint", trainer.output_dir, *out]) == 78
    line = reported(capsys.readouterr().err, command)
    assert MODEL_STATES in line and "refused" in line and "io.open" in line
    assert not marker.exists() and not (tmp_path / "model.pt").exists()


# --- 2. eval of a file that is no checkpoint ----------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "list"])
def test_eval_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, kind):
    file = str(tmp_path / "model.pt")
    if kind == "truncated":
        torch.save({"model": {"w": torch.zeros(10_000)}, "config": {}}, file)
        truncate(file, os.path.getsize(file) // 2)
    elif kind == "text":
        open(file, "w").write("not weights\n" * 50)
    elif kind == "empty":
        open(file, "wb").close()
    else:
        torch.save([1, 2, 3], file)
    assert cli.main(["eval", "--checkpoint", file]) == 78
    assert file in reported(capsys.readouterr().err, "eval")


# --- 3. truncated files of a COMPLETE checkpoint ------------------------------------


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_resume_falls_back_past_a_truncated_checkpoint(trainer, caplog, name):
    first, second = fresh_checkpoints(trainer, 1, 2)
    damaged = os.path.join(second, name)
    truncate(damaged)
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        assert trainer.resume()
    assert trainer.state.step == 1
    assert f"{damaged}' has 1000 bytes" in caplog.text and f"previous complete checkpoint {first}" in caplog.text
    # Marked: keep_last pruning cannot keep it in place of the checkpoints saved from here on.
    assert [s for s, _ in ckpt.list_checkpoints(trainer.checkpoints_root)] == [1]

    truncate(os.path.join(first, name))  # none intact: stop, do not start from scratch
    with pytest.raises(ValueError, match=rf"no intact checkpoint .*step-1: .*{name}' has 1000 bytes"):
        trainer.resume()


def test_export_and_eval_of_a_run_fall_back_past_a_truncated_checkpoint(trainer, tmp_path, capsys):
    from marscale.weights.export import consolidate, export

    first, second = fresh_checkpoints(trainer, 1, 2)
    truncate(os.path.join(second, OPTIM_STATES))
    out = str(tmp_path / "model.pt")
    assert export(trainer.output_dir, out) == first
    exported = torch.load(out, weights_only=True)
    assert exported["step"] == 1
    # The class names the training shards' manifest gives, kept by the checkpoint and the export.
    names = list(ShardSet.load(trainer.cfg.data.val_shards).class_names)
    assert len(names) == trainer.cfg.model.num_classes and exported["class_names"] == names
    _, client = consolidate(trainer.output_dir)  # what `marscale eval --checkpoint RUN` reads
    assert client["train_state"]["step"] == 1 and client["class_names"] == names
    assert ckpt.is_complete(second)  # reading never renames

    assert cli.main(["export", "--checkpoint", second, "--out", out]) == 78
    assert f"{OPTIM_STATES}' has 1000 bytes" in reported(capsys.readouterr().err, "export")


# --- 4. another model size ------------------------------------------------------------


def test_resume_with_another_model_size_is_one_line(trainer, synthetic_shards, tmp_path):
    (path,) = fresh_checkpoints(trainer, 2)
    settings = ("deepspeed.zero_stage=2", "deepspeed.precision=fp32", "model.bridge.depth=1")
    # Refused when the trainer is built, before its engine exists.
    mismatch = r"trained with another model: model\.bridge\.depth is 2 there, 1 now"
    with pytest.raises(ValueError, match=mismatch) as err:
        Trainer(tiny_config(synthetic_shards, tmp_path / "run", *settings, f"checkpoint.resume={path}"))
    assert "\n" not in str(err.value)
    other = Trainer(tiny_config(synthetic_shards, tmp_path / "run", *settings))
    try:
        # No config stored with the checkpoint: DeepSpeed's shape error, in one line.
        no_config = {"marscale": {"train_state": {"step": 3}, "world_size": 1}}
        bare = ckpt.save_checkpoint(trainer.engine, str(tmp_path / "bare"), 3, no_config, keep_last=0)
        with pytest.raises(ValueError, match=r"does not fit this model \(.*classifier\.blocks\.1\.") as err:
            ckpt.load_checkpoint(other.engine, bare)
        assert "\n" not in str(err.value)
    finally:
        other.close()


# --- 5. disk full while saving --------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (room for one tiny checkpoint and ballast), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        reason = getattr(e, "stderr", None) or e
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN: {str(reason).strip()}); "
                    f"tests/test_engine_checkpointing.py simulates ENOSPC instead")
    try:
        yield str(disk)
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            # Busy: a file torch.save left open when the write failed is still referenced.
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_disk_full_while_saving_says_so_and_keeps_the_previous_checkpoint(trainer, small_disk):
    root = os.path.join(small_disk, "checkpoints")
    config = to_dict(trainer.cfg)
    first = ckpt.save_checkpoint(trainer.engine, root, 1, ckpt.client_state(ckpt.TrainState(step=1), 1, config),
                                 keep_last=1)
    with open(os.path.join(small_disk, "ballast"), "wb") as f:  # leave 1 MiB: less than a checkpoint
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 2**20))
    full = rf"^no space left on {root} while saving step 2 \(needs about 0\.0\d+ GB"
    with pytest.raises(RuntimeError, match=full):
        ckpt.save_checkpoint(trainer.engine, root, 2, ckpt.client_state(ckpt.TrainState(step=2), 1, config),
                             keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [1]  # the unfinished step-2 is gone
    assert ckpt.find_checkpoint(root) == first  # intact: every file as recorded
    assert ckpt.load_checkpoint(trainer.engine, first)["marscale"]["train_state"]["step"] == 1


def test_a_start_hashes_the_checkpoint_it_resumes_from_once(trainer, synthetic_shards, monkeypatch):
    """The pre-flight chooses and checks the checkpoint (every file hashed); the trainer
    resumes from that choice instead of checking it again."""
    fresh_checkpoints(trainer, 2)
    checked = []
    original = ckpt.check_checkpoint
    monkeypatch.setattr(ckpt, "check_checkpoint", lambda path: checked.append(path) or original(path))
    resumed = Trainer(trainer.cfg)
    try:
        assert resumed.plan.resume_checkpoint == os.path.join(trainer.checkpoints_root, "step-2")
        assert checked == [resumed.plan.resume_checkpoint]
        assert resumed.fit() == 0 and resumed.state.step == resumed.plan.total_steps
    finally:
        resumed.close()
