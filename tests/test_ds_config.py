"""The DeepSpeed config dict (engine/ds_config.py), checked against DeepSpeed's own parser."""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch

from marscale.engine.config import load_train_config
from marscale.engine.ds_config import build_deepspeed_config, gradient_dtypes

deepspeed = pytest.importorskip("deepspeed")
import deepspeed.comm  # noqa: E402
import deepspeed.runtime.constants as ds_constants  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def cfg_with(*overrides: str):
    # The batch size is pinned here so the arithmetic below does not follow demo.yaml.
    return load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), ["data.batch_size=8", *overrides])


def parse(ds_dict: dict, world_size: int, monkeypatch) -> DeepSpeedConfig:
    """DeepSpeed's parse of `ds_dict` as if `world_size` ranks were running.

    DeepSpeedConfig asks deepspeed.comm for the rank and world size (and falls back to a
    world of 1 without a process group); answer for a pretend world so the batch-size
    arithmetic is checked at that size.
    """
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: world_size)
    return DeepSpeedConfig(dict(ds_dict))


def known_top_level_keys() -> set[str]:
    keys = {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)}
    return keys | {"zero_optimization"}


@pytest.mark.parametrize("stage, precision", list(itertools.product((0, 1, 2, 3), ("bf16", "fp16", "fp32"))))
def test_every_stage_and_precision(stage, precision, monkeypatch):
    cfg = cfg_with(f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "run.device=cuda")
    d = build_deepspeed_config(cfg, world_size=4)

    assert d["train_micro_batch_size_per_gpu"] == 8
    assert d["gradient_accumulation_steps"] == 1
    assert d["train_batch_size"] == 32
    assert d["zero_optimization"]["stage"] == stage
    assert d["bf16"] == {"enabled": precision == "bf16"}
    assert d["fp16"]["enabled"] == (precision == "fp16")
    assert "optimizer" not in d and "scheduler" not in d
    assert d["zero_allow_untested_optimizer"] is True
    assert d["wall_clock_breakdown"] is False
    assert d["steps_per_print"] >= 10**9
    assert set(d) <= known_top_level_keys()

    zero = d["zero_optimization"]
    if stage == 0:
        assert zero == {"stage": 0}
    else:
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
        assert zero["reduce_bucket_size"] == 500_000_000
        assert "offload_optimizer" not in zero
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    assert ("allgather_bucket_size" in zero) == (stage in (1, 2))
    if precision == "fp16":
        assert d["fp16"] == {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }

    parsed = parse(d, 4, monkeypatch)
    assert parsed.world_size == 4
    assert parsed.train_batch_size == 32
    assert parsed.train_micro_batch_size_per_gpu == 8
    assert parsed.gradient_accumulation_steps == 1
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.gradient_clipping == 1.0  # demo.yaml: clip_grad 1.0
    assert parsed.optimizer_name is None and parsed.scheduler_name is None
    assert parsed.zero_allow_untested_optimizer is True
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save is True
        assert parsed.zero_config.param_persistence_threshold == 100_000
    if precision == "fp16":
        assert parsed.float16_config.loss_scale == 0
        assert parsed.float16_config.initial_scale_power == 16


def test_accumulation_clipping_offload_and_universal(monkeypatch):
    cfg = cfg_with(
        "deepspeed.grad_accum_steps=4",
        "deepspeed.offload_optimizer=true",
        "deepspeed.reduce_bucket_size=2e8",
        "optim.clip_grad=null",
        "run.device=cuda",
    )
    d = build_deepspeed_config(cfg, world_size=8, load_universal=True)
    assert d["train_batch_size"] == 8 * 8 * 4
    assert d["gradient_accumulation_steps"] == 4
    # DeepSpeed clips at 1.0 unless told otherwise: "no clipping" must be an explicit 0.
    assert d["gradient_clipping"] == 0.0
    assert d["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert d["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    parsed = parse(d, 8, monkeypatch)
    assert parsed.train_batch_size == 256 and parsed.gradient_accumulation_steps == 4
    assert parsed.gradient_clipping == 0.0
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.offload_optimizer.pin_memory is True
    assert parsed.load_universal_checkpoint is True


def test_batch_arithmetic_matches_deepspeed_at_the_given_world_size(monkeypatch):
    d = build_deepspeed_config(cfg_with(), world_size=2)
    with pytest.raises(AssertionError, match="train_batch_size"):
        parse(d, 3, monkeypatch)  # built for 2 ranks, parsed on 3: DeepSpeed refuses


@pytest.mark.parametrize("name", ["mar_vit_b_k400", "mar_vit_l_ssv2", "vit_h_k400", "demo"])
def test_presets_give_valid_configs(name, monkeypatch):
    cfg = load_train_config(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    d = build_deepspeed_config(cfg, world_size=8)
    parsed = parse(d, 8, monkeypatch)
    assert parsed.train_batch_size == cfg.data.batch_size * 8 * cfg.deepspeed.grad_accum_steps
    assert parsed.zero_optimization_stage == cfg.deepspeed.zero_stage


def test_parser_rejects_unknown_section_keys(monkeypatch):
    """The check above means something: a misspelt ZeRO or precision key fails to parse."""
    d = build_deepspeed_config(cfg_with(), world_size=1)
    d["zero_optimization"] = {**d["zero_optimization"], "overlap_comms": True}
    with pytest.raises(Exception, match="overlap_comms"):
        parse(d, 1, monkeypatch)


# (precision, stage) -> (communication_data_type, grad_accum_dtype) with both left at auto
RESOLVED = {
    **{("bf16", s): ("fp32", "fp32") for s in (1, 2, 3)},
    ("bf16", 0): ("fp32", "bf16"),  # ZeRO-0 keeps the gradients in the bf16 parameters
    **{("fp16", s): ("fp16", "fp16") for s in range(4)},
    **{("fp32", s): ("fp32", "fp32") for s in range(4)},
}


@pytest.mark.parametrize("precision, stage", list(RESOLVED))
def test_gradient_dtypes_are_always_written(precision, stage, monkeypatch):
    """Left out, DeepSpeed reduces and accumulates bf16 gradients in bf16: the dict states
    both dtypes for every precision, and DeepSpeed reads them back."""
    cfg = cfg_with(f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "run.device=cuda")
    communication, accumulation = RESOLVED[precision, stage]
    assert gradient_dtypes(cfg.deepspeed) == (communication, accumulation)
    d = build_deepspeed_config(cfg, world_size=2)
    assert d["communication_data_type"] == communication
    assert d["data_types"] == {"grad_accum_dtype": accumulation}
    parsed = parse(d, 2, monkeypatch)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert parsed.communication_data_type == dtypes[communication]
    assert parsed.grad_accum_dtype == accumulation


def test_gradient_dtypes_can_be_set(monkeypatch):
    cfg = cfg_with("deepspeed.precision=bf16", "deepspeed.communication_data_type=bf16",
                   "deepspeed.grad_accum_dtype=bf16", "run.device=cuda")
    assert gradient_dtypes(cfg.deepspeed) == ("bf16", "bf16")
    cfg = cfg_with("deepspeed.precision=fp16", "deepspeed.communication_data_type=fp32", "run.device=cuda")
    with pytest.raises(ValueError, match=re.escape("set fp32 or fp16 or auto")):
        cfg_with("deepspeed.precision=fp16", "deepspeed.communication_data_type=bf16")
    assert gradient_dtypes(cfg.deepspeed) == ("fp32", "fp16")
    assert parse(build_deepspeed_config(cfg, 1), 1, monkeypatch).communication_data_type == torch.float32


@pytest.mark.parametrize("overrides, message", [
    (("deepspeed.precision=bf16", "deepspeed.zero_stage=0", "deepspeed.grad_accum_dtype=fp32"),
     "deepspeed.grad_accum_dtype=fp32 under deepspeed.precision=bf16, ZeRO-0: set bf16 or auto"),
    (("deepspeed.precision=fp16", "deepspeed.grad_accum_dtype=bf16"),
     "deepspeed.grad_accum_dtype=bf16 under deepspeed.precision=fp16, ZeRO-2: set fp16 or auto"),
    (("deepspeed.precision=fp32", "deepspeed.communication_data_type=bf16"),
     "deepspeed.communication_data_type=bf16 under deepspeed.precision=fp32: set fp32 or auto"),
    (("deepspeed.grad_accum_dtype=fp64",), "grad_accum_dtype"),
])
def test_gradient_dtypes_deepspeed_cannot_run_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg_with(*overrides)
