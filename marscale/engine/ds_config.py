"""The DeepSpeed config dict, generated from the typed TrainConfig.

The dict is the only way settings reach DeepSpeed; the JSON copy written next to a run
is a record. There are no "optimizer" or "scheduler" sections: we pass our own AdamW
(with layer-wise lr groups, see optim.py) and set each group's lr every step.

Every key below is one DeepSpeed 0.19 reads (deepspeed/runtime/config.py,
runtime/zero/config.py, runtime/precision_config.py); tests/test_ds_config.py parses
the result with `deepspeed.runtime.config.DeepSpeedConfig`, whose ZeRO and precision
sections reject unknown keys.
"""

from __future__ import annotations

from typing import Any

from marscale.engine.config import DeepSpeedConfig, TrainConfig

# We log ourselves on logging.every_steps; DeepSpeed's own progress prints stay off.
_NEVER = 1_000_000_000


def _zero_section(cfg: TrainConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update(
        overlap_comm=ds.overlap_comm,
        contiguous_gradients=ds.contiguous_gradients,
        reduce_scatter=True,
        reduce_bucket_size=ds.reduce_bucket_size,
    )
    if ds.zero_stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ds.allgather_bucket_size)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=ds.stage3_gather_16bit_weights_on_model_save,
        )
    return zero


def _precision_sections(cfg: TrainConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    fp16: dict[str, Any] = {"enabled": ds.precision == "fp16"}
    if ds.precision == "fp16":
        fp16.update(
            loss_scale=0,  # 0 = dynamic loss scaling
            initial_scale_power=ds.initial_scale_power,
            loss_scale_window=ds.loss_scale_window,
            hysteresis=ds.hysteresis,
            min_loss_scale=ds.min_loss_scale,
        )
    return {"bf16": {"enabled": ds.precision == "bf16"}, "fp16": fp16}


def gradient_dtypes(ds: DeepSpeedConfig) -> tuple[str, str]:
    """(communication_data_type, grad_accum_dtype): the dtypes gradients are reduced and
    accumulated in, with `auto` resolved. Both are always written into the DeepSpeed dict:
    left out, DeepSpeed 0.19 reduces and accumulates in the compute dtype (bf16 too)."""
    communication = ds.communication_data_type
    if communication == "auto":
        communication = "fp32" if ds.precision == "bf16" else ds.precision
    accumulation = ds.grad_accum_dtype
    if accumulation == "auto":
        # ZeRO-0 keeps the gradients in the bf16 parameters (DeepSpeed refuses fp32 there);
        # ZeRO-1 takes DeepSpeed's BF16_Optimizer with fp32 accumulation, 2 and 3 an fp32
        # gradient partition.
        accumulation = "fp32" if ds.precision == "bf16" and ds.zero_stage >= 1 else ds.precision
    return communication, accumulation


def build_deepspeed_config(cfg: TrainConfig, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The dict for `deepspeed.initialize(config=...)` on `world_size` data-parallel ranks.

    load_universal: the run resumes from a universal conversion of its checkpoint (saved on
    another world size; `marscale.checkpoints.reshape` decides)."""
    ds = cfg.deepspeed
    communication, accumulation = gradient_dtypes(ds)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        # DeepSpeed's own rule: micro-batch x accumulation x world (with a token budget
        # the micro-batch size is the most a micro-batch holds).
        "train_batch_size": cfg.data.batch_size * cfg.deepspeed.grad_accum_steps * world_size,
        # DeepSpeed's default is 1.0; 0.0 is its "no clipping".
        "gradient_clipping": float(cfg.optim.clip_grad) if cfg.optim.clip_grad is not None else 0.0,
        "zero_optimization": _zero_section(cfg),
        **_precision_sections(cfg),
        "communication_data_type": communication,
        "data_types": {"grad_accum_dtype": accumulation},
        # Our AdamW is a torch optimizer DeepSpeed may not have tested with ZeRO; with
        # offload, build_optimizer hands it DeepSpeed's CPU Adam.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
