"""AdamW parameter groups with layer-wise lr decay, the optimizer, and the lr schedule.

Layer ids follow VideoMAE/BEiT: 0 for the tubelet embedding (and position table or
tokens, if a model had them as parameters), i+1 for encoder block i, and depth+1 for
everything after the encoder blocks (encoder.norm, decoder, bridging classifier, head).
A parameter in lr layer l trains at lr x layer_decay ** (depth + 1 - l), so the heads
get the full lr and the embedding the smallest. Which parameters take their layer's
scale, and which get weight decay, is `optim.layer_decay_scope` (`lr_layer_and_decay`).

The schedule is a pure function of the step (`lr_at`, form `optim.schedule`); the
training loop calls `apply_lr(optimizer, lr_at(step, ...))` before each optimizer step,
which scales it per group by the group's `lr_scale`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from marscale.engine.config import LayerDecayScope, LrSchedule, OptimConfig

# Leaf names (after the last dot) of parameters that get no weight decay whatever their
# shape: learned tokens and position tables, as in VideoMAE's skip list.
NO_DECAY_NAMES = ("mask_token", "cls_token", "pos_embed")
_EMBED_PREFIXES = ("patch_embed", "pos_embed", "cls_token", "mask_token")


def layer_id(name: str, num_layers: int) -> int:
    """Layer id of parameter `name` of a MARModel / ViTClassifier (see module docstring)."""
    if name.startswith("module."):  # wrapped by DeepSpeed / DDP
        name = name[len("module.") :]
    if not name.startswith("encoder."):
        return num_layers + 1  # decoder.*, classifier.*, head.*
    rest = name[len("encoder.") :]
    if rest.startswith(_EMBED_PREFIXES):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return num_layers + 1  # encoder.norm


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases (incl. q_bias / v_bias) and tokens are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def lr_layer_and_decay(name: str, param: torch.Tensor, num_layers: int, scope: LayerDecayScope) -> tuple[int, bool]:
    """(lr layer, weight decay or not) of parameter `name` under `optim.layer_decay_scope`.

    "all" (VideoMAE's fine-tuning): every parameter takes its `layer_id`; norms, biases
    and tokens get no weight decay (`no_weight_decay`).
    "weights" (the MAR reference's `construct_optimizer`): biases (incl. q/v biases and
    the tubelet embedding's), norms and a position table / cls token train at lr x1 (lr
    layer depth+1) with no weight decay; the mask token is put in layer 0 by name and
    decayed; every other parameter (the weight matrices) takes its `layer_id`, decayed.
    """
    if scope == "all":
        return layer_id(name, num_layers), not no_weight_decay(name, param)
    if scope != "weights":
        raise ValueError(f"optim.layer_decay_scope={scope!r} is not 'all' or 'weights'")
    leaf = name.rsplit(".", 1)[-1]
    # 1-D: norm weights and biases, q_bias / v_bias (the reference: "bias" / "norm" in the name).
    if param.ndim <= 1 or name.endswith(".bias") or leaf in ("cls_token", "pos_embed"):
        return num_layers + 1, False
    if leaf == "mask_token":
        # The reference names it "mask_token" at the model's top level, which its
        # get_num_layer_for_vit maps to layer 0; not being a bias or norm, it is decayed.
        return 0, True
    return layer_id(name, num_layers), True


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, num_layers: int, scope: LayerDecayScope
) -> list[dict]:
    """AdamW groups, one per (lr layer, decay or not), ordered by lr layer.

    Each group: {"name": "layer3_decay", "params": [...], "weight_decay": wd or 0.0,
    "lr_scale": layer_decay ** (num_layers + 1 - lr layer)}; the lr layer and decay of
    each parameter come from `lr_layer_and_decay(..., scope)`. Frozen parameters
    (requires_grad False) are left out.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decay = lr_layer_and_decay(name, param, num_layers, scope)
        if not 0 <= lid <= num_layers + 1:
            raise ValueError(f"parameter {name!r} has layer id {lid}, outside [0, {num_layers + 1}]: wrong num_layers?")
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "name": f"layer{lid}_{'decay' if decay else 'no_decay'}",
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def _num_layers(model: nn.Module) -> int:
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "blocks"):
        raise ValueError(f"{type(model).__name__} has no encoder.blocks: cannot assign layer-wise lr decay")
    return len(encoder.blocks)


def build_optimizer(
    model: nn.Module, optim_cfg: OptimConfig, device_type: str, *, offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model, ...)`, the implementation chosen by `optim_cfg.fused`.

    device_type: where the parameters live during the step ("cuda", "cpu", ...).
    offload: DeepSpeed ZeRO-Offload is on; the step runs on the CPU with DeepSpeed's CPU
    Adam (which DeepSpeed requires with offload), whatever `fused` says.
    Initial group lrs are lr x lr_scale; the loop overrides them with `apply_lr`.
    """
    groups = param_groups(
        model, optim_cfg.weight_decay, optim_cfg.layer_decay, _num_layers(model), optim_cfg.layer_decay_scope
    )
    for g in groups:
        g["lr"] = optim_cfg.lr * g["lr_scale"]
    kwargs = dict(lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)

    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)

    choice = optim_cfg.fused
    if choice == "auto":
        choice = "torch" if device_type == "cuda" else "foreach"
    if choice == "torch":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if choice == "foreach":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if choice == "none":
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kwargs)
    if device_type != "cuda":
        raise ValueError(f"optim.fused={choice!r} needs CUDA parameters (device is {device_type!r}); use 'auto'")
    if choice == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if choice == "apex":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
        except ImportError as e:
            raise ValueError("optim.fused='apex' but apex is not installed; use 'auto' (torch fused AdamW)") from e
        return ApexFusedAdam(groups, adam_w_mode=True, **kwargs)
    raise ValueError(f"optim.fused={optim_cfg.fused!r} is not a known AdamW implementation")


def _cosine(progress: float, base_lr: float, min_lr: float) -> float:
    """Half cosine from base_lr (progress 0) to min_lr (progress 1)."""
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at(
    step: int,
    *,
    schedule: LrSchedule,
    base_lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> float:
    """Learning rate before optimizer step `step` (0-based); min_lr from total_steps on.

    "warmup_then_cosine" (VideoMAE): linear from warmup_lr (step 0) to base_lr (step
    warmup_steps), then a half cosine from base_lr down to min_lr over the remaining
    total_steps - warmup_steps steps.
    "cosine_whole_run" (the MAR reference, SlowFast's lr_policy in steps): the cosine
    min_lr + (base_lr - min_lr) (1 + cos(pi step / total_steps)) / 2 spans the whole run,
    warm-up included; during warm-up a line from warmup_lr (step 0) to that cosine's value
    at step warmup_steps, so the peak is that value, a little below base_lr.
    """
    if schedule == "cosine_whole_run":
        peak = _cosine(min(1.0, warmup_steps / total_steps), base_lr, min_lr)
        if step < warmup_steps:
            return warmup_lr + (peak - warmup_lr) * step / warmup_steps
        return _cosine(min(1.0, step / total_steps), base_lr, min_lr)
    if schedule != "warmup_then_cosine":
        raise ValueError(f"optim.schedule={schedule!r} is not 'warmup_then_cosine' or 'cosine_whole_run'")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return base_lr if step < total_steps else min_lr
    return _cosine(min(1.0, (step - warmup_steps) / decay_steps), base_lr, min_lr)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr x its lr_scale (groups without one get lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
