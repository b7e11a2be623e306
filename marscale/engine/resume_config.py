"""What a resumed run may change: its config compared with the checkpoint's, setting by setting.

Every checkpoint holds the effective config of the run that wrote it (the client state,
`marscale.checkpoints.folders.client_state`). That copy is the one compared, not
`RUN/config.yaml`: the run folder records the newest start, which may be ahead of the
checkpoint (a start that changed a setting and stopped before its first save). The
trainer reads it once, on the main rank, from the checkpoint the pre-flight chose
(`check_resume_config`), before the engine is built.

Each setting (a dotted key, `masking.ratio`) that differs is one of:

    refused    the checkpoint cannot continue under the new value; one line names each
               such setting, both values and what to do, before anything is built:
               the model (every `model.*` key but `FREE_ON_RESUME`'s, and
               `clip.tubelet_size`): the weights have its shapes;
               `deepspeed.precision`: DeepSpeed keeps each precision's optimizer state
               in other files and classes (its loader fails on another one);
               `deepspeed.grad_accum_dtype`: under bf16 with ZeRO-1 it picks the class;
               `optim.layer_decay_scope`: the optimizer state is grouped by it.
    noted      one line each, in one block on the main rank, saying what the change
               does from the resumed step on (`NOTES`): learning rate and schedule,
               length, masking, batch and data, augmentation, regularisation, logging,
               evaluation and checkpoint cadence, timeouts. The optimizer takes the new
               weight decay, betas, eps, layer decay and gradient clipping
               (`OptimizerSettings`: DeepSpeed's loaders would bring the saved ones back).
    not compared  `NOT_COMPARED`: `checkpoint.resume` (how this start finds the
               checkpoint) and `deepspeed.zero_stage` (refused, with the stage to set,
               by `marscale.checkpoints.reshape`; the number of ranks may change there).

Settings that change nothing in the numbers (`data.num_workers`, `logging.*`, bucket
sizes) are still listed: a resume states every difference, and a reader of the log
should not have to know which ones matter. Keys only one of the two configs has (the
config tree changed between versions) are not compared; a checkpoint without a stored
config is not compared at all (DeepSpeed's shape errors still become one line).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

from marscale.checkpoints.integrity import FREE_ON_RESUME, read_model_states
from marscale.engine.config import TrainConfig
from marscale.weights.layouts import CheckpointError

logger = logging.getLogger(__name__)


class SettingCannotChange(CheckpointError):
    """The run's config differs from the checkpoint's in a setting that cannot change on
    resume; the message (one line) names each one, both values and what to do."""


NOT_COMPARED = {
    "checkpoint.resume": "how this start finds the checkpoint",
    "deepspeed.zero_stage": "refused with the stage to set by marscale.checkpoints.reshape",
}
"""Settings left out of the comparison, and why."""

FIXED = {
    "deepspeed.precision": "DeepSpeed keeps each precision's optimizer state in other files",
    "deepspeed.grad_accum_dtype": "under bf16 with ZeRO-1 it picks DeepSpeed's optimizer class "
    "(BF16_Optimizer for fp32, its ZeRO-1 optimizer for bf16), each with its own checkpoint files",
    "optim.layer_decay_scope": "the optimizer state is grouped by it",
}
"""Settings outside the model that cannot change on resume, and why (the model's are
`is_model_setting`)."""

_FRESH_WEIGHTS = "no effect on resume: the checkpoint's weights replace the initial ones"
_SCHEDULE = "the lr schedule, a function of the step: the lr follows the new one from the resumed step"
_GEOMETRY = (
    "the clips per step and steps per epoch: the data position is where the new plan puts the resumed step, "
    "so the data order differs from the original run"
)
_AUGMENT = "the training augmentation from the resumed step"
_EVAL = "the evaluation only"
_SPEED = "loading or communication only: the same numbers"
_LOSS_SCALE = "fp16 only, and no effect on resume: the checkpoint's loss scaler continues with its own settings"

NOTES = {
    "clip": "what a training clip holds from the resumed step",
    "clip.num_frames": "the token grid (positions are sinusoidal and follow it): tokens and FLOPs per clip",
    "clip.img_size": "the token grid (positions are sinusoidal and follow it): tokens and FLOPs per clip",
    "model.drop_path": "regularisation from the resumed step",
    "model.head_dropout": "regularisation from the resumed step",
    "model.grad_checkpointing": "recomputation only: the same numbers, other memory and speed",
    "model.attention": "the attention kernel: the same maths, rounding may differ",
    "model.pretrained": _FRESH_WEIGHTS,
    "model.pretrained_partial": _FRESH_WEIGHTS,
    "model.init_scale": _FRESH_WEIGHTS,
    "model.bridge.init": _FRESH_WEIGHTS,
    "masking": "the masks from the resumed step: tokens and FLOPs per step follow",
    "masking.eval_ratio": _EVAL,
    "masking.eval_complement": _EVAL,
    "masking.eval_temporal_shuffle": _EVAL,
    "data": "the training data from the resumed step",
    "data.train_shards": "another training set, from the resumed step's position in the epoch",
    "data.batch_size": _GEOMETRY,
    "data.token_budget": _GEOMETRY,
    "data.budget_unit": _GEOMETRY,
    "data.clips_per_video": _GEOMETRY,
    "data.samples_per_epoch": _GEOMETRY + "; with run.max_steps null, also the run's length",
    "data.seed": "the order of the data stream from the resumed step",
    "data.shuffle_buffer": "the order of the data stream from the resumed step",
    "data.num_workers": _SPEED,
    "data.decoder": "the video decoder: frames may differ in the last bit",
    "data.decode_threads": _SPEED,
    "data.val_shards": _EVAL,
    "data.short_side": "the evaluation resize",
    "data.test_num_clips": _EVAL,
    "data.test_num_crops": _EVAL,
    "data.eval_batch_size": _EVAL,
    "data.flip": _AUGMENT,
    "data.flip_label_pairs": _AUGMENT,
    "data.augment_on": _AUGMENT + " (another random stream)",
    "data.rand_augment": _AUGMENT,
    "data.rand_augment_before_crop": _AUGMENT,
    "data.random_erasing": _AUGMENT,
    "data.rrc_scale": _AUGMENT,
    "data.rrc_ratio": _AUGMENT,
    "data.mixup": _AUGMENT,
    "data.cutmix": _AUGMENT,
    "data.label_smoothing": "the training loss from the resumed step",
    "optim": "the optimizer from the resumed step; its moments continue",
    "optim.lr": _SCHEDULE,
    "optim.min_lr": _SCHEDULE,
    "optim.warmup_lr": _SCHEDULE,
    "optim.warmup_epochs": _SCHEDULE,
    "optim.schedule": _SCHEDULE,
    "optim.epochs": "with run.max_steps null, the run's length, and so the lr schedule",
    "optim.recon_weight": "the loss from the resumed step",
    "optim.fused": "the AdamW implementation",
    "deepspeed": _SPEED,
    "deepspeed.grad_accum_steps": _GEOMETRY,
    "deepspeed.communication_data_type": "the dtype gradients are reduced in: their rounding from the resumed step",
    "deepspeed.offload_optimizer": "where the optimizer steps (the optimizer state moves to or from CPU memory)",
    "deepspeed.initial_scale_power": _LOSS_SCALE,
    "deepspeed.loss_scale_window": _LOSS_SCALE,
    "deepspeed.hysteresis": _LOSS_SCALE,
    "deepspeed.min_loss_scale": _LOSS_SCALE,
    "deepspeed.stage3_gather_16bit_weights_on_model_save": "how ZeRO-3 saves model files",
    "checkpoint": "the checkpoint cadence",
    "logging": "logging only",
    "run.name": "the name in logs only",
    "run.output_dir": "where this run writes its checkpoints, logs and records",
    "run.seed": "the masks from the resumed step (dropout and mixup continue the checkpoint's random streams)",
    "run.max_steps": "the run's length, and so the lr schedule",
    "run.eval_every_steps": "the evaluation cadence",
    "run.device": "the device it trains on",
    "run.collective_timeout_s": "how long the ranks wait for each other",
    "run.setup_timeout_s": "how long the ranks wait for each other",
}
"""What a change of each setting does on resume, by its dotted key or the nearest section
above it (a setting added later gets its section's note until it has its own)."""

_DEFAULT_NOTE = "takes effect from the resumed step"


@dataclasses.dataclass(frozen=True)
class SettingChange:
    """One setting whose value differs from the checkpoint's run."""

    key: str
    """Dotted key, e.g. `masking.ratio`."""
    saved: Any
    """The value the checkpoint was trained with."""
    now: Any
    """The value of this run."""

    @property
    def note(self) -> str:
        """What the change does on resume (`NOTES`, by key or the nearest section)."""
        parts = self.key.split(".")
        for end in range(len(parts), 0, -1):
            note = NOTES.get(".".join(parts[:end]))
            if note is not None:
                return note
        return _DEFAULT_NOTE

    def line(self) -> str:
        """`resume: masking.ratio 0.5 -> 0.75 (the masks from the resumed step: ...)`."""
        return f"resume: {self.key} {_show(self.saved)} -> {_show(self.now)} ({self.note})"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def is_model_setting(key: str) -> bool:
    """Whether `key` shapes the weights: a checkpoint continues only with the value it was
    trained with (the same rule as `marscale.checkpoints.integrity.check_same_model`)."""
    return (key.startswith("model.") and key not in FREE_ON_RESUME) or key == "clip.tubelet_size"


def _sections(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def flatten(config: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a config as a dict (`to_dict`), one entry per setting of the
    schema `cls`: sections open up, values stay whole (a `masking.ratio` given as a
    mapping is one setting). Keys the schema does not have (retired ones) are left out."""
    sections = _sections(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    flat = {}
    for key, value in config.items():
        if key not in names:
            continue
        if key in sections and isinstance(value, dict):
            flat.update(flatten(value, sections[key], f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare(saved: dict[str, Any], now: dict[str, Any]) -> list[SettingChange]:
    """The settings in which config `now` differs from `saved` (both as dicts), in the
    schema's order, without `NOT_COMPARED` and keys only one of them has."""
    then, current = flatten(saved), flatten(now)
    return [
        SettingChange(key, then[key], value)
        for key, value in current.items()
        if key in then and key not in NOT_COMPARED and then[key] != value
    ]


def refusal(checkpoint: str, changes: list[SettingChange]) -> str | None:
    """The one-line error for the changes that cannot be resumed, or None if there are none."""
    model = [c for c in changes if is_model_setting(c.key)]
    other = [c for c in changes if c.key in FIXED]
    if not model and not other:
        return None
    parts = []
    if model:
        parts.append(
            "another model: " + ", ".join(f"{c.key} is {_show(c.saved)} there, {_show(c.now)} now" for c in model)
        )
    parts += [f"another {c.key}: {_show(c.saved)} there, {_show(c.now)} now ({FIXED[c.key]})" for c in other]
    return (
        f"checkpoint {checkpoint} was trained with {'; '.join(parts)}. Resume it with the values it was saved "
        f"with, or start a new run (another run.output_dir) from its weights: marscale export, then "
        f"model.pretrained=..."
    )


def saved_config(checkpoint: str) -> dict[str, Any] | None:
    """The effective config checkpoint `checkpoint` was trained with, or None if it holds none."""
    stored = read_model_states(checkpoint).get("marscale", {}).get("config")
    return stored if isinstance(stored, dict) else None


def check_resume_config(checkpoint: str, config: dict[str, Any]) -> list[SettingChange]:
    """The settings in which `config` (this run's, as a dict) differs from the one
    `checkpoint` was trained with; raises `SettingCannotChange` (one line) if any of them
    cannot change on resume. Reads the checkpoint's model states file once."""
    saved = saved_config(checkpoint)
    if saved is None:
        return []
    changes = compare(saved, config)
    problem = refusal(checkpoint, changes)
    if problem is not None:
        raise SettingCannotChange(problem)
    return changes


def log_changes(checkpoint: str, changes: list[SettingChange]) -> None:
    """The block of `resume:` lines, one per changed setting (the main rank logs INFO)."""
    if changes:
        lines = "\n".join(c.line() for c in changes)
        logger.info("resuming %s with %d setting(s) changed:\n%s", checkpoint, len(changes), lines)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer settings the config gave the engine, to give them back after a load.

    DeepSpeed's loaders restore each parameter group's hyperparameters with the optimizer
    state (torch's `load_state_dict`; DeepSpeed's ZeRO-3 universal loader even gives every
    group the first one's), and ZeRO-1/2's also the gradient clipping (`clip_grad`), so a
    resumed run would keep the saved weight decay, betas, eps, layer decay and clipping
    whatever its config says. Taken before the load and put back after it, the config's
    apply (the same values when nothing changed); the moments and step counts stay the
    checkpoint's. The lr needs nothing: the loop sets it before every step (`apply_lr`).
    """

    groups: tuple[dict[str, Any], ...]
    clip_grad: float | None

    GROUP_KEYS: typing.ClassVar[tuple[str, ...]] = ("weight_decay", "lr_scale", "betas", "eps")

    @classmethod
    def of(cls, optimizer) -> OptimizerSettings:
        """The settings `optimizer` (DeepSpeed's wrapper or the torch optimizer) has now."""
        groups = tuple({k: g[k] for k in cls.GROUP_KEYS if k in g} for g in optimizer.param_groups)
        return cls(groups=groups, clip_grad=getattr(optimizer, "clip_grad", None))

    def apply(self, optimizer) -> None:
        """Give `optimizer` these settings again (its groups are the same, in the same order:
        the model and `optim.layer_decay_scope` cannot change on resume)."""
        for group, settings in zip(optimizer.param_groups, self.groups, strict=True):
            group.update(settings)
        if self.clip_grad is not None:
            optimizer.clip_grad = self.clip_grad
