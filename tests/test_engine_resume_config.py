"""A resume states every setting that differs from the checkpoint's run, one line each,
refuses in one line the settings that cannot change, and trains with the new values.

The in-process runs resume a checkpoint saved without training (the demo config with tiny
clips, ZeRO-2 fp32: DeepSpeed's ZeRO-1/2 loader is the one that brings the saved gradient
clipping back with the optimizer state).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_engine_trainer import tiny_config

from marscale.checkpoints import folders as ckpt
from marscale.core import dist
from marscale.core.config import to_dict
from marscale.engine import resume_config
from marscale.engine.config import load_train_config
from marscale.engine.resume_config import (
    NOTES,
    OptimizerSettings,
    SettingChange,
    compare,
    flatten,
)
from marscale.engine.trainer import Trainer

ZERO2 = ("deepspeed.zero_stage=2", "deepspeed.precision=fp32")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()


@pytest.fixture(scope="module")
def checkpoint(synthetic_shards, tmp_path_factory) -> str:
    """step-3 of a run of 4 steps per epoch (epoch 0, batch 3), saved without training."""
    trainer = Trainer(tiny_config(synthetic_shards, tmp_path_factory.mktemp("saved"), *ZERO2))
    try:
        trainer.state = ckpt.TrainState(step=3, samples_seen=12, epoch=0, batch_in_epoch=3)
        return trainer.save()
    finally:
        trainer.close()


def run_dir(checkpoint: str) -> str:
    """The run folder a `RUN/checkpoints/step-N` checkpoint belongs to."""
    return os.path.dirname(os.path.dirname(checkpoint))


def resume_lines(caplog) -> list[str]:
    return [
        line
        for r in caplog.records
        if r.name == resume_config.__name__
        for line in r.getMessage().splitlines()
        if line.startswith("resume: ")
    ]


def test_changed_settings_are_logged_one_line_each_and_train(checkpoint, synthetic_shards, tmp_path, caplog):
    changed = (
        "masking.ratio=0.75", "optim.weight_decay=0.5", "optim.clip_grad=0.25", "data.batch_size=8",
        "run.max_steps=4",
    )
    cfg = tiny_config(synthetic_shards, tmp_path, *ZERO2, f"checkpoint.resume={checkpoint}", *changed)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg)
    try:
        blocks = [r for r in caplog.records if r.name == resume_config.__name__]
        assert len(blocks) == 1  # one block, in the schema's order
        assert resume_lines(caplog) == [
            "resume: masking.ratio 0.5 -> 0.75 (the masks from the resumed step: tokens and FLOPs per step follow)",
            (
                "resume: data.batch_size 4 -> 8 (the clips per step and steps per epoch: the data position is "
                "where the new plan puts the resumed step, so the data order differs from the original run)"
            ),
            "resume: optim.weight_decay 0.05 -> 0.5 (the optimizer from the resumed step; its moments continue)",
            "resume: optim.clip_grad 1.0 -> 0.25 (the optimizer from the resumed step; its moments continue)",
            (
                f"resume: run.output_dir {run_dir(checkpoint)!r} -> {str(tmp_path)!r} (where this run writes its "
                f"checkpoints, logs and records)"
            ),
            "resume: run.max_steps 6 -> 4 (the run's length, and so the lr schedule)",
        ]

        assert trainer.resume()
        # The new values reach the optimizer (DeepSpeed's load brought the saved ones back).
        groups = trainer.engine.optimizer.param_groups
        assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.5]
        assert trainer.engine.optimizer.clip_grad == 0.25
        # 2 steps per epoch now: the saved position (epoch 0, batch 3) lies past the epoch;
        # step 3 is batch 1 of epoch 1 in the new plan.
        assert (trainer.state.step, trainer.state.epoch, trainer.state.batch_in_epoch) == (3, 1, 1)
        assert trainer.fit() == 0
        assert trainer.state.step == 4
    finally:
        trainer.close()


def test_an_unchanged_config_logs_no_difference(checkpoint, synthetic_shards, caplog):
    cfg = tiny_config(synthetic_shards, run_dir(checkpoint), *ZERO2, f"checkpoint.resume={checkpoint}")
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg)
    try:
        assert trainer.resume_from is not None and trainer.resume_from.checkpoint == checkpoint
        assert resume_lines(caplog) == []
        assert not [r for r in caplog.records if r.name == resume_config.__name__]
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("model.variant=vit_s", "another model: model.variant is 'vit_tiny' there, 'vit_s' now"),
        ("model.num_classes=5", "another model: model.num_classes is 4 there, 5 now"),
        ("deepspeed.precision=bf16", "another deepspeed.precision: 'fp32' there, 'bf16' now"),
        ("optim.layer_decay_scope=weights", "another optim.layer_decay_scope: 'all' there, 'weights' now"),
    ],
)
def test_a_setting_that_cannot_change_is_refused_in_one_line(checkpoint, synthetic_shards, tmp_path, setting,
                                                             expected):
    cfg = tiny_config(synthetic_shards, tmp_path, *ZERO2, f"checkpoint.resume={checkpoint}", setting)
    # Before the engine exists: no trainer to close.
    with pytest.raises(resume_config.SettingCannotChange) as err:
        Trainer(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {checkpoint} was trained with {expected}")
    assert "start a new run (another run.output_dir) from its weights" in message


def demo_dict(*overrides: str) -> dict:
    return to_dict(load_train_config("demo", list(overrides)))


def test_a_mapping_valued_setting_is_one_setting_and_retired_or_new_keys_are_not_compared():
    saved = demo_dict()
    saved["checkpoint"]["load_universal"] = True  # a key retired since
    del saved["run"]["collective_timeout_s"]  # a key added since
    now = demo_dict("masking.ratio={min: 0.25, max: 0.75}", "masking.eval_ratio=0.5", "run.collective_timeout_s=60")
    assert [(c.key, c.saved, c.now) for c in compare(saved, now)] == [
        ("masking.ratio", 0.5, {"min": 0.25, "max": 0.75}),
        ("masking.eval_ratio", None, 0.5),
    ]
    assert compare(saved, demo_dict("checkpoint.resume=auto")) == []  # how a start finds its checkpoint


def test_every_setting_is_refused_or_has_a_note():
    """A setting added later gets its section's note; one without any says only that it
    takes effect, which is not enough to read a resume's log by."""
    for key in flatten(demo_dict()):
        fixed = resume_config.is_model_setting(key) or key in resume_config.FIXED
        if fixed or key in resume_config.NOT_COMPARED:
            assert key not in NOTES, key
        else:
            assert SettingChange(key, 0, 1).note != resume_config._DEFAULT_NOTE, key


def test_optimizer_settings_outlive_a_load_of_other_ones():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(3))

    def adamw(weight_decay: float, betas: tuple[float, float], scale: float) -> torch.optim.AdamW:
        groups = [{"params": [w], "weight_decay": weight_decay, "lr_scale": scale},
                  {"params": [b], "weight_decay": 0.0, "lr_scale": 1.0}]
        return torch.optim.AdamW(groups, lr=1e-3, betas=betas)

    saved = adamw(0.05, (0.9, 0.999), 0.5)
    w.grad, b.grad = torch.ones(3, 3), torch.ones(3)
    saved.step()
    now = adamw(0.3, (0.8, 0.99), 0.25)
    configured = OptimizerSettings.of(now)
    now.load_state_dict(saved.state_dict())
    assert now.param_groups[0]["weight_decay"] == 0.05  # torch restores the saved settings...
    configured.apply(now)
    assert [(g["weight_decay"], g["betas"], g["lr_scale"]) for g in now.param_groups] == [
        (0.3, (0.8, 0.99), 0.25),
        (0.0, (0.8, 0.99), 1.0),
    ]
    # ...and the moments stay the checkpoint's.
    torch.testing.assert_close(now.state[w]["exp_avg"], saved.state[w]["exp_avg"])
