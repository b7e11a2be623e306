"""Parameters and FLOPs of MAR and full-token video ViTs, counted on the real modules.

Every number comes from running the model built on the meta device (shapes only, no
memory, no arithmetic) under `torch.utils.flop_counter.FlopCounterMode`, which counts
matmuls, convolutions and attention. Nothing here is a formula: the analytic formula
lives in the tests as a cross-check.

Two units, named apart everywhere:
- MACs (multiply-accumulates) - what the MAR and VideoMAE papers call "FLOPs" (ViT-B
  180 G per view). `marscale cost` prints these, labelled GFLOPs as the papers do.
- FLOPs (true hardware FLOPs) = 2 x MACs. Achieved TFLOP/s and MFU must use these.

What is counted (per clip, batch 1; costs are linear in the batch):
- inference (one view): encoder + bridging classifier (MAR) or encoder + mean-pool head
  (full tokens). The tubelet embedding runs on all N tokens; MAR gathers the visible ones
  after it. The reconstruction decoder does not run at inference.
- training: forward (encoder, classifier and, for MAR, the reconstruction decoder) plus
  backward as autograd runs it: for every matmul the gradient w.r.t. its input and
  w.r.t. its weight (2x the forward), for attention the gradients of q, k, v (2x the
  forward's two matmuls), and for the tubelet embedding only the weight gradient (the
  clip needs none). Activation recomputation (gradient checkpointing) is not counted:
  these are model FLOPs, the numerator of MFU.
- Norms, GELU, softmax, adds and the loss are not counted (as in the papers).

Python API (for the training loop's TFLOP/s and MFU):
    model_flops_per_clip(model_cfg, mask_ratio, training=True)  # true FLOPs
    model_macs_per_clip(model_cfg, mask_ratio, training=True)   # MACs, papers' "FLOPs"
    count_model(model_cfg, mask_ratio)                          # everything, by part
The rows of `marscale cost` are built from these in `marscale.cost_table`.

Which tokens are visible does not change the cost, only how many: N - round(ratio * N).

Counting runs every op of the model through Python meta kernels (one to two seconds for
ViT-L or ViT-H), so each count is kept in memory for the process and on disk across
processes (`marscale.cost_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from marscale import cost_cache
from marscale.losses import total_loss
from marscale.model import BridgeConfig, ModelConfig, build_model


@dataclasses.dataclass(frozen=True)
class _CountKey:
    """Everything a FLOP count depends on (ModelConfig is mutable, so not hashable)."""

    arch: str
    variant: str
    img_size: int
    num_frames: int
    tubelet_size: int
    num_classes: int
    decoder: bool
    bridge: tuple[int, int, int]
    num_visible: int

    @classmethod
    def of(cls, cfg: ModelConfig, mask_ratio: float) -> _CountKey:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n = cfg.num_tokens
        return cls(
            cfg.arch,
            cfg.variant,
            cfg.img_size,
            cfg.num_frames,
            cfg.tubelet_size,
            cfg.num_classes,
            cfg.decoder,
            (cfg.bridge.embed_dim, cfg.bridge.depth, cfg.bridge.num_heads),
            n - round(mask_ratio * n),
        )

    def model_config(self) -> ModelConfig:
        # Dropout and stochastic depth cost no matmuls; they are switched off so the meta
        # run has fewer ops. No gradient checkpointing: model FLOPs exclude recomputation.
        embed_dim, depth, num_heads = self.bridge
        return ModelConfig(
            num_classes=self.num_classes,
            arch=self.arch,
            variant=self.variant,
            img_size=self.img_size,
            num_frames=self.num_frames,
            tubelet_size=self.tubelet_size,
            drop_path=0.0,
            head_dropout=0.0,
            decoder=self.decoder,
            bridge=BridgeConfig(embed_dim, depth, num_heads),
            grad_checkpointing=0,
        )


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """Counted parameters and MACs of one model at one number of visible tokens (per clip)."""

    tokens: int
    """N, tokens per clip."""
    visible_tokens: int
    """Nv, tokens the encoder runs on."""
    params_inference: int
    """Encoder + classifier (bridging classifier or head)."""
    params_training: int
    """All trained parameters, incl. the reconstruction decoder."""
    macs_encoder: int
    """Forward MACs of the encoder (tubelet embedding on all N tokens + blocks on Nv)."""
    macs_classifier: int
    """Forward MACs of the bridging classifier (MAR) or the mean-pool head (full tokens)."""
    macs_decoder: int
    """Forward MACs of the reconstruction decoder (training only; 0 when it does not run)."""
    macs_backward: int
    """Backward MACs of one training step (what autograd runs: see the module docstring)."""

    @property
    def macs_inference(self) -> int:
        return self.macs_encoder + self.macs_classifier

    @property
    def macs_training_forward(self) -> int:
        return self.macs_encoder + self.macs_classifier + self.macs_decoder

    @property
    def macs_training(self) -> int:
        return self.macs_training_forward + self.macs_backward


def _num_params(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _count_on_meta(key: _CountKey) -> ModelCount:
    cfg = key.model_config()
    model = build_model(cfg, device="meta")
    model.train()
    n, nv = cfg.num_tokens, key.num_visible
    video = torch.empty(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device="meta")
    visible_idx = masked_idx = None
    if nv < n:
        visible_idx = torch.arange(nv, device="meta").unsqueeze(0)  # [1, Nv]
        masked_idx = torch.arange(nv, n, device="meta").unsqueeze(0)  # [1, Nm]
    soft_target = torch.empty(1, cfg.num_classes, device="meta")

    # Forward and backward under separate counters: the forward's per-module split is
    # exact, while backward ops are not reliably attributed to the module they belong to.
    with FlopCounterMode(display=False) as fwd:
        out = model(video, visible_idx, masked_idx)
    loss = total_loss(out, soft_target, recon_weight=1.0)["loss"]
    with FlopCounterMode(display=False) as bwd:
        loss.backward()

    classifier = model.classifier if cfg.arch == "mar" else model.head
    decoder = getattr(model, "decoder", None)
    by_module = fwd.get_flop_counts()
    root = type(model).__name__

    def part(name: str) -> int:
        return sum(by_module.get(f"{root}.{name}", {}).values()) // 2

    parts = {"encoder": part("encoder"), "classifier": part("classifier" if cfg.arch == "mar" else "head")}
    parts["decoder"] = part("decoder") if decoder is not None else 0
    total = fwd.get_total_flops() // 2
    if sum(parts.values()) != total:
        raise RuntimeError(f"forward MACs by module {parts} do not add up to the total {total}")
    # The decoder runs in this training forward; at inference it is skipped, and encoder and
    # classifier do the same matmuls in eval mode (dropout and drop path are not matmuls).
    return ModelCount(
        tokens=n,
        visible_tokens=nv,
        params_inference=_num_params(model.encoder, classifier),
        params_training=_num_params(model),
        macs_encoder=parts["encoder"],
        macs_classifier=parts["classifier"],
        macs_decoder=parts["decoder"],
        macs_backward=bwd.get_total_flops() // 2,
    )


@functools.lru_cache(maxsize=None)
def _count(key: _CountKey) -> ModelCount:
    name = json.dumps(dataclasses.asdict(key), sort_keys=True)
    stored = cost_cache.load(name)
    if stored is not None:
        return ModelCount(**stored)
    count = _count_on_meta(key)
    cost_cache.store(name, dataclasses.asdict(count))
    return count


def count_model(cfg: ModelConfig, mask_ratio: float) -> ModelCount:
    """Parameters and per-clip MACs of `cfg` with `mask_ratio` of the tokens masked.

    Counted once per shape on the meta device and cached. `cfg.arch` picks the model
    (MAR or full-token ViT); `cfg.decoder` whether MAR training runs the decoder.
    """
    return _count(_CountKey.of(cfg, mask_ratio))


def model_macs_per_clip(cfg: ModelConfig, mask_ratio: float, training: bool) -> int:
    """Multiply-accumulates for one clip: the papers' "FLOPs" (ViT-B full: 180e9).

    training=False: one inference forward (encoder + classifier).
    training=True: forward (incl. the decoder for MAR) + backward.
    """
    count = count_model(cfg, mask_ratio)
    return count.macs_training if training else count.macs_inference


def model_flops_per_clip(cfg: ModelConfig, mask_ratio: float, training: bool) -> int:
    """True hardware FLOPs for one clip (2 x MACs): the numerator of TFLOP/s and MFU."""
    return 2 * model_macs_per_clip(cfg, mask_ratio, training)
