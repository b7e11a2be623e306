"""The training config tree: one dataclass per YAML section, checks, and derived values.

    TrainConfig
      clip: ClipConfig            marscale/core/clip.py: frames, size, tubelets, pixel stats, sampling
      model: ModelConfig          marscale/model/config.py
      masking: MaskingConfig      marscale/tokens/masking.py
      data: DataConfig            marscale/data/config.py
      optim: OptimConfig          optimizer and learning-rate schedule
      deepspeed: DeepSpeedConfig  ZeRO stage, precision, accumulation (-> ds_config.py)
      checkpoint: CheckpointConfig
      logging: LoggingConfig
      run: RunConfig              output folder, seed, length, device

Each file in `configs/` maps one-to-one onto this tree (`load_train_config`). Values
that follow from several fields, the world size and the data - global batch, steps per
epoch, total and warm-up steps, tokens and FLOPs per clip - are computed once, in the
run plan (`marscale.engine.plan`); the config itself is never patched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import ClassVar, Literal

import torch

from marscale.core.clip import ClipConfig, token_grid
from marscale.core.choices import check_choices
from marscale.core.config import load_config
from marscale.core.timeouts import check_timeout
from marscale.data.config import DataConfig
from marscale.tokens.masking import MaskingConfig
from marscale.model.config import ModelConfig

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The torch dtype the model computes in for each `deepspeed.precision`."""
GradientDtype = Literal["auto", "fp32", "bf16", "fp16"]
LayerDecayScope = Literal["all", "weights"]
LrSchedule = Literal["warmup_then_cosine", "cosine_whole_run"]


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW with layer-wise lr decay, cosine schedule with linear warm-up (the `optim:` section).

    The VideoMAE-style baselines use VideoMAE's rules (`layer_decay_scope: all`,
    `schedule: warmup_then_cosine`, the defaults); the MAR presets the reference code's
    (`weights`, `cosine_whole_run`)."""

    lr: float
    """Peak learning rate, absolute: it is not rescaled by the batch size. The presets
    give the value the recipe used with its global batch (see each preset's comment)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0; it rises linearly over the warm-up (to the peak `schedule` says)."""
    warmup_epochs: float = 5.0
    """Length of the linear warm-up, in epochs (converted to optimizer steps)."""
    epochs: int
    """Training length in epochs (unless `run.max_steps` is set)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; not applied to norms and biases (tokens: `layer_decay_scope`)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: encoder block i trains at lr x layer_decay^(depth - i); the
    heads at lr. 1.0 turns it off (use that when training from scratch). Which
    parameters it applies to is `layer_decay_scope`."""
    layer_decay_scope: LayerDecayScope = "all"
    """Which parameters take their layer's lr scale, and which get weight decay. Lr
    layers: 0 the tubelet embedding, i+1 encoder block i, d+1 the rest (d = encoder
    depth); layer l trains at lr x layer_decay^(d+1-l). Weight matrices get the same lr
    and decay in both scopes (patch embedding and encoder blocks by layer; the decoder's
    encoder_to_decoder, blocks and head, the classifier's embedding, blocks and head at
    lr x1; all decayed). The scopes differ in biases, LayerNorms and the mask token:
    - all (VideoMAE's fine-tuning, optim_factory.py get_parameter_groups): every encoder
      parameter, biases, q/v biases and LayerNorms included, takes its block's layer;
      encoder.norm, decoder and heads lr x1. No weight decay on 1-D parameters, biases
      and tokens: the decoder's mask token trains at lr x1 without decay.
    - weights (the MAR reference, models/utils/optimizer.py construct_optimizer with
      LAYER_LRDECAY on): every bias (encoder ones incl. q/v biases and the patch
      embedding's; the decoder's and classifier's) trains at lr x1 (x BIAS_LR_MULT, 1.0 in
      every MAR config, not modelled) without weight decay; every LayerNorm (the
      reference: "norm" in the name) and a position table or cls token, if they were
      parameters, at lr x1 without weight decay. The mask token is put in layer 0 by its
      name (the reference's get_num_layer_for_vit): lr x layer_decay^(d+1), 0.65^13 for
      K400 ViT-B, with weight decay."""
    schedule: LrSchedule = "warmup_then_cosine"
    """Form of the lr schedule, in optimizer steps (warm-up and total from the run plan).
    warmup_then_cosine (VideoMAE): linear from `warmup_lr` to `lr` over the warm-up, then
    a half cosine from `lr` to `min_lr` over the remaining steps.
    cosine_whole_run (the MAR reference, models/utils/lr_policy.py get_lr_at_epoch with
    lr_func_cosine, SlowFast's, per iteration): one half cosine
    min_lr + (lr - min_lr) (1 + cos(pi step / total)) / 2 over the whole run, warm-up
    included; during warm-up a line from `warmup_lr` to that cosine's value at the
    warm-up's end, so the peak is a little below `lr` (9.94e-4 for lr 1e-3, min_lr 1e-6,
    5 of 100 epochs of warm-up). Both stay at `min_lr` from the last step on."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    recon_weight: float = 0.01
    """w in loss = CE + w x reconstruction MSE (MAR: 0.01 Kinetics-400, 0.1 SSv2).
    Ignored for `model.arch: vit` and when the model has no decoder."""
    fused: Literal["auto", "torch", "deepspeed", "apex", "none"] = "auto"
    """AdamW implementation. auto: torch's fused kernel on CUDA, the multi-tensor
    (foreach) one elsewhere; torch: torch fused on any device; deepspeed / apex: their
    FusedAdam (CUDA only, must be installed); none: the single-tensor reference loop.
    With `deepspeed.offload_optimizer` DeepSpeed's CPU Adam is used whatever this says."""

    def __post_init__(self):
        check_choices(self)
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if not 0 <= self.warmup_lr <= self.lr:
            raise ValueError(f"optim.warmup_lr must be in [0, optim.lr={self.lr}], got {self.warmup_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs} (use run.max_steps for shorter runs)")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), e.g. [0.9, 0.999]; got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] (1.0 = off), got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optim.clip_grad must be > 0, or null for no clipping; got {self.clip_grad}")
        if self.recon_weight < 0:
            raise ValueError(f"optim.recon_weight must be >= 0, got {self.recon_weight}")


@dataclasses.dataclass
class DeepSpeedConfig:
    """How DeepSpeed wraps the model (the `deepspeed:` section; see ds_config.py)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 shard optimizer state, 2 + gradients,
    3 + parameters. Stage 3 needs every rank to run the same modules each step."""
    precision: Precision = "bf16"
    """bf16 | fp16 (dynamic loss scaling) | fp32. Master weights stay fp32 under bf16/fp16."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (multiplies the global batch)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer state in pinned CPU memory and step on the CPU
    (DeepSpeed's CPU Adam). Needs zero_stage >= 1."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (ZeRO >= 1)."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    reduce_bucket_size: int = 500_000_000
    """Elements reduced at a time (ZeRO >= 1)."""
    allgather_bucket_size: int = 500_000_000
    """Elements all-gathered at a time after the ZeRO-1/2 optimizer step."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: parameter elements fetched ahead of use."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters smaller than this stay unpartitioned (biases, norms)."""
    stage3_gather_16bit_weights_on_model_save: bool = True
    """ZeRO-3: gather full weights when saving a model file (so exports need no conversion)."""
    initial_scale_power: int = 16
    """fp16: the dynamic loss scale starts at 2^initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale is raised."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is lowered."""
    min_loss_scale: int = 1
    """fp16: lower bound of the dynamic loss scale."""
    communication_data_type: GradientDtype = "auto"
    """The dtype gradients are reduced across ranks in. auto: fp32 under bf16 (DeepSpeed's
    own default would reduce in bf16), else the precision (fp16: DeepSpeed's loss-scaled
    fp16 reduction). Set: fp32 or the precision. `ds_config.gradient_dtypes` resolves it."""
    grad_accum_dtype: GradientDtype = "auto"
    """The dtype gradients are accumulated in, over micro-batches and before the optimizer
    step. auto: fp32 under bf16 with ZeRO 1-3 (DeepSpeed's default would accumulate in
    bf16), else the precision (ZeRO-0 has no fp32 accumulation under bf16: DeepSpeed keeps
    the gradients in the bf16 parameters). Set: the precision, or fp32 under bf16 with ZeRO >= 1."""

    def __post_init__(self):
        check_choices(self)
        if self.grad_accum_steps < 1:
            raise ValueError(f"deepspeed.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO: set deepspeed.zero_stage to 1, 2 or 3")
        for name in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "loss_scale_window",
            "hysteresis",
            "min_loss_scale",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"deepspeed.{name} must be >= 1, got {getattr(self, name)}")
        if self.stage3_param_persistence_threshold < 0:
            raise ValueError("deepspeed.stage3_param_persistence_threshold must be >= 0")
        if not 0 <= self.initial_scale_power <= 32:
            raise ValueError(f"deepspeed.initial_scale_power must be in [0, 32], got {self.initial_scale_power}")
        if self.communication_data_type not in ("auto", "fp32", self.precision):
            raise ValueError(
                f"deepspeed.communication_data_type={self.communication_data_type} under "
                f"deepspeed.precision={self.precision}: set {' or '.join(dict.fromkeys(('fp32', self.precision)))} "
                f"or auto"
            )
        if self.grad_accum_dtype not in ("auto", self.precision) and not (
            self.grad_accum_dtype == "fp32" and self.precision == "bf16" and self.zero_stage >= 1
        ):
            # DeepSpeed 0.19: ZeRO-0 accumulates in the parameters' dtype ("unsupported mix"
            # otherwise); fp32 accumulation under fp16 is a path we neither use nor test.
            raise ValueError(
                f"deepspeed.grad_accum_dtype={self.grad_accum_dtype} under deepspeed.precision={self.precision}, "
                f"ZeRO-{self.zero_stage}: set {self.precision} or auto (fp32 needs bf16 and zero_stage >= 1)"
            )


@dataclasses.dataclass
class CheckpointConfig:
    """When checkpoints are written and where a run resumes from (the `checkpoint:` section)."""

    every_steps: int = 1000
    """Save every N optimizer steps (0: no periodic saves)."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints and delete older ones (0: keep all)."""
    resume: str = ""
    """"" start fresh; "auto" resume from the newest complete checkpoint in
    run.output_dir if there is one; otherwise the path of a checkpoint folder."""
    save_at_end: bool = True
    """Save a checkpoint after the last step."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "load_universal": "a checkpoint resumed on another number of ranks is converted to DeepSpeed's "
        "universal format by the run itself (marscale/checkpoints/reshape.py)",
    }

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0 (0: only at the end), got {self.every_steps}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0: keep all), got {self.keep_last}")


@dataclasses.dataclass
class LoggingConfig:
    """What is logged and how often (the `logging:` section)."""

    every_steps: int = 20
    """Log loss, lr, throughput and MFU every N optimizer steps (the only host syncs)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under run.output_dir/tb (if tensorboard is installed)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the training precision, for MFU. None: look
    it up from the device name; unknown devices and CPUs report no MFU."""

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"logging.every_steps must be >= 1, got {self.every_steps}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"logging.peak_tflops must be > 0, or null to look it up; got {self.peak_tflops}")


@dataclasses.dataclass
class RunConfig:
    """Where a run writes, how long it runs, and on what (the `run:` section)."""

    name: str = "run"
    """Run name (logs, TensorBoard)."""
    output_dir: str = ""
    """Folder for checkpoints, logs and the effective config ("": runs/<name>)."""
    seed: int = 0
    """Seed of model init, masking and dropout (the data stream has data.seed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; None: optim.epochs x steps per epoch. The
    lr schedule spans this length either way."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (CUDA if available, else CPU) | cuda | cpu."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, all-gather, barrier) waits for the other ranks
    before the run stops with an error naming the lost peer (exit status 69), on gloo and
    NCCL (whose asynchronous error handling marscale turns on). A rank killed outright is
    usually noticed at once; a node that drops off the network or hangs only after this
    long. It must exceed the longest time one rank legitimately works while the others
    wait: saving and hashing a checkpoint (about its size / disk throughput, all files on
    the main rank), converting one for another world size on resume (once, on the main
    rank), uneven evaluation, the first step. The default (30 min, torch's) is
    safe; on a large cluster set it to a few minutes more than the measured checkpoint
    save, e.g. 600 for ViT-L/H on fast storage, so a lost node costs minutes, not half an hour.
    At most 365 days; `.inf` waits without a practical limit (the process group is given
    365 days: `marscale.core.timeouts`)."""
    setup_timeout_s: float = 300.0
    """Seconds every rank has to join the process group at start (the master's rendezvous
    port, gloo's connections, NCCL's first collective). Past it a rank prints one line and
    exits with status 69 (a node did not start or cannot reach the master), whatever
    run.collective_timeout_s is. Raise it when nodes start far apart (a slow shared file
    system, an image pulled at start); `.inf`: no deadline."""

    def __post_init__(self):
        check_choices(self)
        if not self.name:
            raise ValueError("run.name must not be empty")
        if not self.output_dir:
            self.output_dir = os.path.join("runs", self.name)
        if self.seed < 0:
            raise ValueError(f"run.seed must be >= 0, got {self.seed}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1, or null for epochs x steps per epoch; got {self.max_steps}")
        if self.eval_every_steps < 0:
            raise ValueError(f"run.eval_every_steps must be >= 0 (0: only at the end), got {self.eval_every_steps}")
        check_timeout("run.setup_timeout_s", self.setup_timeout_s)
        check_timeout("run.collective_timeout_s", self.collective_timeout_s)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """A whole training run. Building one runs `validate` (the cross-section checks)."""

    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    """The clip every component reads: frames, size, tubelets, pixel statistics, sampling."""
    model: ModelConfig
    """Network to build."""
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    """Which tokens the encoder sees."""
    data: DataConfig
    """Shards, sampling, augmentation and batch size."""
    optim: OptimConfig
    """Optimizer and learning-rate schedule."""
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging cadence and MFU."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Output folder, seed, length, device."""

    def __post_init__(self):
        validate(self)


def validate(cfg: TrainConfig) -> None:
    """Checks that span sections. Runs whenever a TrainConfig is built (so on every load).

    Choices made here:
    - `model.arch: vit` (the full-token baseline) with any masking is an error, not a
      warning: a baseline that silently drops tokens would corrupt every comparison
      with MAR. Set `masking.kind: none`.
    - `model.arch: mar` with `masking.kind: none` is allowed (an ablation: every token
      visible, no reconstruction loss) and logged as a warning.
    """
    m, d, k, c = cfg.model, cfg.data, cfg.masking, cfg.clip
    grid = token_grid(c, m.patch_size)  # raises when clip.img_size does not fit the patch size
    if d.short_side < c.img_size:
        raise ValueError(
            f"data.short_side={d.short_side} < clip.img_size={c.img_size}: evaluation crops "
            f"clip.img_size squares from frames resized to short_side; set data.short_side >= clip.img_size"
        )
    if m.arch == "vit" and k.kind != "none":
        raise ValueError(
            f"model.arch=vit is the full-token baseline but masking.kind={k.kind!r}; set masking.kind: none "
            f"(or use model.arch: mar to train on visible tokens)"
        )
    if m.arch == "mar" and k.kind == "none":
        logger.warning(
            "model.arch=mar with masking.kind=none: every token is visible and no reconstruction loss is used"
        )
    if k.kind == "cell_running":
        _, gh, gw = grid
        ch, cw = k.cell
        if gh % ch or gw % cw:
            raise ValueError(
                f"masking.cell={list(k.cell)} does not tile the {gh}x{gw} token grid of clip.img_size {c.img_size}; "
                f"choose a cell size that divides it"
            )
    k.check_grid(grid)
    if cfg.run.device == "cpu" and cfg.deepspeed.precision == "fp16":
        raise ValueError("deepspeed.precision=fp16 is not supported on CPU; use bf16 or fp32")
    if cfg.deepspeed.offload_optimizer and cfg.run.device == "cpu":
        raise ValueError("deepspeed.offload_optimizer is for GPU training; on CPU the optimizer already runs there")


PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
"""The presets shipped inside the package (`marscale/configs/*.yaml`, package data, so an
installed wheel has them; a checkout also links them as `configs/`)."""


def presets() -> list[str]:
    """Names of the packaged presets (`demo`, `mar_vit_l_k400`, ...)."""
    return sorted(name[:-5] for name in os.listdir(PRESETS_DIR) if name.endswith(".yaml") and name[0] != "_")


def resolve_config_path(name_or_path: str | os.PathLike) -> str:
    """A YAML file, or the name of a packaged preset (`mar_vit_l_k400`, `demo.yaml`)."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    preset = os.path.join(PRESETS_DIR, path if path.endswith(".yaml") else f"{path}.yaml")
    if os.sep not in path and os.path.isfile(preset):
        return preset
    raise FileNotFoundError(f"config {path!r} is neither a file nor a preset (presets: {', '.join(presets())})")


def load_train_config(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML config (a file or a preset name) + `--set key=value` overrides -> a checked TrainConfig."""
    return load_config(TrainConfig, resolve_config_path(name_or_path), overrides)
