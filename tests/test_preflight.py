"""The pre-flight (marscale.engine.preflight): every problem it can see before the first
step, all in one error; the Trainer and `marscale eval` run it first.

On the session's synthetic shards: 4 classes, 8 training shards, 4 evaluation shards.
"""

from __future__ import annotations

import collections
import os
import re
import shutil

import pytest
from helpers import DEMO_CONFIG, run_overrides

from marscale.engine import preflight as preflight_module
from marscale.engine.config import load_train_config
from marscale.checkpoints.folders import checkpoint_bytes
from marscale.engine.preflight import PreflightError, preflight
from marscale.data.shards import load_manifest, save_manifest


def config(shards: dict[str, str], out, *overrides: str):
    return load_train_config(DEMO_CONFIG, [*run_overrides(shards, out), "data.num_workers=1", *overrides])


def problems_of(cfg, world_size: int = 1, **kw) -> list[str]:
    with pytest.raises(PreflightError) as info:
        preflight(cfg, world_size, **kw)
    message = str(info.value)
    assert message.startswith(f"{len(info.value.problems)} problem(s) found before the first step:")
    assert all(f"  - {p}" in message for p in info.value.problems)
    return info.value.problems


def test_a_good_run_passes_and_gets_its_plan(synthetic_shards, tmp_path):
    plan = preflight(config(synthetic_shards, tmp_path / "run"), 1)
    assert plan.num_classes == 4 and plan.val_set.num_videos == 8


def test_checkpoint_size_follows_deepspeeds_files():
    # Bytes a parameter of the files DeepSpeed 0.x wrote for a 2M-parameter model on CPU
    # (all within 0.02 of these): module in the training dtype + fp32 master + AdamW moments.
    measured = {(0, "fp32"): 12, (0, "bf16"): 14, (1, "bf16"): 14, (2, "fp32"): 16, (3, "bf16"): 12, (3, "fp32"): 12}
    for (stage, precision), per_param in measured.items():
        assert checkpoint_bytes(1000, precision, stage) == 1000 * per_param
    assert checkpoint_bytes(1000, "fp16", 2) == checkpoint_bytes(1000, "bf16", 2)


def test_evaluation_needs_a_shard_per_reader_before_training(synthetic_shards, tmp_path):
    # Before: this came after the whole training run, from the evaluation loader.
    cfg = config(synthetic_shards, tmp_path, "data.num_workers=2", "data.batch_size=4")  # a step on 3 ranks
    problem, = problems_of(cfg, world_size=3)
    assert "4 shards but evaluation reads with 3 ranks x 2 workers = 6 readers" in problem
    assert preflight(cfg, 2).world_size == 2  # 2 x 2 readers for 4 shards


def test_classes_of_both_sets_against_the_model(synthetic_shards, tmp_path):
    problems = problems_of(config(synthetic_shards, tmp_path, "model.num_classes=3"))
    assert sorted(problems) == sorted(
        f"{synthetic_shards[split]} has 4 classes but model.num_classes is 3; set model.num_classes=4"
        for split in ("train", "val")
    )


def test_the_two_sets_must_name_their_classes_alike(synthetic_shards, tmp_path):
    val = str(tmp_path / "val")
    shutil.copytree(synthetic_shards["val"], val)
    manifest = load_manifest(val)
    manifest.class_names = manifest.class_names[1:2] + manifest.class_names[:1] + manifest.class_names[2:]
    save_manifest(val, manifest)
    problem, = problems_of(config({"train": synthetic_shards["train"], "val": val}, tmp_path / "run"))
    assert problem.startswith(f"{synthetic_shards['train']} and {val} name 2 classes differently, e.g. class 0 is "
                              "'move_right' in one and 'move_left' in the other")


def test_missing_shard_files_and_manifests(synthetic_shards, tmp_path):
    train = str(tmp_path / "train")
    shutil.copytree(synthetic_shards["train"], train)
    for name in ("train-000002.tar", "train-000005.tar"):
        os.remove(os.path.join(train, name))
    shards = {"train": train, "val": str(tmp_path / "nowhere")}
    problems = problems_of(config(shards, tmp_path / "run"))
    assert problems == [
        f"no manifest.json in {shards['val']!r}: is this a marscale shard folder?",
        f"{train}: 2 of the 8 shard files its manifest lists are missing, e.g. train-000002.tar, train-000005.tar",
    ]
    # `marscale eval` reads no training shard: only the manifest (the plan) is needed.
    assert problems_of(config(shards, tmp_path / "run"), training=False) == problems[:1]


def test_disk_space_for_one_checkpoint(synthetic_shards, tmp_path, monkeypatch):
    cfg = config(synthetic_shards, tmp_path / "new" / "run", "deepspeed.zero_stage=1", "deepspeed.precision=bf16")
    from marscale.cost.counting import count_model

    params = count_model(cfg.model, cfg.clip, 0.5).params_training
    usage = collections.namedtuple("usage", "total used free")
    seen = []

    def disk_usage(path):
        seen.append(path)
        return usage(10**12, 10**12 - 10**6, 10**6)

    monkeypatch.setattr(preflight_module.shutil, "disk_usage", disk_usage)
    problem, = problems_of(cfg)
    assert seen == [str(tmp_path)]  # the nearest folder that exists: the run makes the rest
    need = f"{14 * params / 1e9:.2f} GB"
    assert re.search(rf"a checkpoint \(\d+\.\dM parameters, bf16, ZeRO-1\) needs about {need}, 0.00 GB free on "
                     rf"{re.escape(str(tmp_path))}$", problem), problem
    # No checkpoint to write, nothing to check; the eval command writes none either.
    assert preflight(config(synthetic_shards, tmp_path, "checkpoint.save_at_end=false"), 1)
    assert preflight(cfg, 1, training=False)


def test_every_problem_in_one_error(synthetic_shards, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchcodec") is not None:
        pytest.skip("needs a decoder that is not installed")
    cfg = config(
        synthetic_shards, tmp_path, "model.num_classes=3", "data.decoder=torchcodec", "data.samples_per_epoch=1",
        f"model.pretrained={tmp_path / 'missing.pt'}", f"checkpoint.resume={tmp_path / 'no_run'}",
    )
    problems = problems_of(cfg)
    assert len(problems) == 5, problems
    expected = ["model.num_classes is 3", "model.num_classes is 3", "decoder 'torchcodec' is not installed",
                "missing.pt' does not exist", "checkpoint.resume: checkpoint"]
    for text in expected:
        assert sum(text in p for p in problems) >= 1, (text, problems)
    # Once the classes fit, make_plan's own check shows: an epoch of 1 video is no step.
    cfg = config(synthetic_shards, tmp_path, "data.samples_per_epoch=1")
    problem, = problems_of(cfg)
    assert "less than one optimizer step" in problem


def test_trainer_runs_it_before_deepspeed(synthetic_shards, tmp_path, monkeypatch):
    import deepspeed

    from marscale.engine.trainer import Trainer

    def initialize(**kw):
        raise AssertionError("deepspeed.initialize reached")

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    with pytest.raises(PreflightError, match="evaluation reads with 1 ranks x 5 workers"):
        Trainer(config(synthetic_shards, tmp_path, "data.num_workers=5"))
    assert not os.path.exists(tmp_path / "config.yaml")  # stopped before writing any record


def test_eval_command_runs_it(synthetic_shards, tmp_path, capsys, monkeypatch):
    import torch

    from marscale.cli import main
    from marscale.model import build_model

    monkeypatch.delenv("MARSCALE_TRACEBACK", raising=False)
    cfg = config(synthetic_shards, tmp_path)
    weights = str(tmp_path / "model.pt")
    torch.save(build_model(cfg.model, cfg.clip).state_dict(), weights)
    overrides = [f"--set={o}" for o in run_overrides(synthetic_shards, tmp_path)]
    args = ["eval", "--checkpoint", weights, "--config", DEMO_CONFIG, *overrides, "--set", "data.num_workers=5"]
    assert main(args) == 78
    err = capsys.readouterr().err
    # Log lines may come first (the root logger is set up by an earlier in-process command).
    assert "\nmarscale eval: error: 1 problem(s) found before the first step:" in "\n" + err
    assert "evaluation reads with 1 ranks x 5 workers" in err


def _agree_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = preflight_module._agree(["shard missing on this node"] if rank == 1 else [])
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_agree_before_raising(tmp_path):
    # A rank whose checks pass must not go on to wait in DeepSpeed for the rank that failed.
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {
            0: ["the pre-flight failed on rank(s) [1]: see their errors"],
            1: ["shard missing on this node"],
        }


def test_an_attention_backend_that_cannot_train_here_is_refused(synthetic_shards, tmp_path):
    """Packed batches with a backend this machine lacks: refused before the first step,
    in one line, not a traceback from the first forward."""
    for backend, named in (("torch_varlen", "no CPU kernel"), ("flex", "cannot train on CPU")):
        cfg = config(synthetic_shards, tmp_path, "masking.ratio=[0.25,0.5]", "masking.eval_ratio=0.5",
                     f"model.attention={backend}")
        assert any(named in p for p in problems_of(cfg)), backend


def test_an_hf_model_not_in_the_local_cache_is_named_with_how_to_download_it(synthetic_shards, tmp_path,
                                                                              monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    problem, = problems_of(config(synthetic_shards, tmp_path, "model.pretrained=hf:MCG-NJU/videomae-base"))
    assert problem.startswith("model.pretrained: hf:MCG-NJU/videomae-base is not in the local Hugging Face cache")
    assert "`hf download MCG-NJU/videomae-base`" in problem


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["auto", "flash_varlen", "torch_varlen", "flex", "sdpa_mask", "per_clip"])
def test_attention_on_cuda_is_checked_against_the_precision(monkeypatch, name, precision):
    """The varlen kernels have no fp32 path: an fp32 run with per-clip ratios on CUDA (the
    demo config is fp32) is refused in one line naming the backend, the precision and what
    to set. The device is data here: no GPU is needed to check a CUDA run."""
    from marscale.model import attention

    monkeypatch.setattr(attention, "_has_flash_attn", lambda: True)  # auto -> flash_varlen
    problem = preflight_module.attention_problem(name, "cuda", precision)
    if precision == "fp32" and name in ("auto", "flash_varlen", "torch_varlen"):
        backend = "flash_varlen" if name == "auto" else name
        named = f"model.attention=auto ({backend} on cuda)" if name == "auto" else f"model.attention={name}"
        assert problem.startswith(f"{named} computes in fp16/bf16 only"), problem
        assert "no fp32 kernel" in problem and "this run computes in fp32" in problem
        assert problem.endswith("set deepspeed.precision=bf16, or model.attention=flex, sdpa_mask or per_clip")
        assert "\n" not in problem
    else:
        assert problem is None, problem


def test_attention_on_cpu_still_names_the_missing_kernel_first():
    assert "no CPU kernel" in preflight_module.attention_problem("torch_varlen", "cpu", "fp32")
    assert preflight_module.attention_problem("auto", "cpu", "fp32") is None
