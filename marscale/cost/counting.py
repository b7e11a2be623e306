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
    model_flops_per_clip(model_cfg, clip_cfg, mask_ratio, training=True)  # true FLOPs
    model_macs_per_clip(model_cfg, clip_cfg, mask_ratio, training=True)   # MACs, papers' "FLOPs"
    count_model(model_cfg, clip_cfg, mask_ratio)                          # everything, by part
The rows of `marscale cost` are built from these in `marscale.cost.table`.

Which tokens are visible does not change the cost, only how many: the masking's own count
(`marscale.tokens.masking.visible_tokens`, the rule the masks use).

Counting runs every op of the model through Python meta kernels (one to two seconds for
ViT-L or ViT-H), so each count is kept in memory for the process and on disk across
processes (`marscale.cost.cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from fractions import Fraction

import torch
from torch.utils.flop_counter import FlopCounterMode

from marscale.cost import cache as cost_cache
from marscale.core.clip import ClipConfig, num_tokens, token_grid
from marscale.engine.loss import MARLoss
from marscale.model import BridgeConfig, DecoderConfig, ModelConfig, build_model
from marscale.tokens.masking import MaskingConfig
from marscale.tokens.packing import pack_mask


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


def _count_on_meta(cfg: ModelConfig, clip: ClipConfig, nv: int) -> ModelCount:
    model = build_model(cfg, clip, device="meta")
    model.train()
    n = num_tokens(clip, cfg.patch_size)
    video = torch.empty(1, 3, clip.num_frames, clip.img_size, clip.img_size, device="meta")
    tokens = pack_mask(torch.arange(n).unsqueeze(0) >= nv).to("meta")  # the first Nv of N tokens visible
    soft_target = torch.empty(1, cfg.num_classes, device="meta")

    # Forward and backward under separate counters: the forward's per-module split is
    # exact, while backward ops are not reliably attributed to the module they belong to.
    with FlopCounterMode(display=False) as fwd:
        out = model(video, tokens)
    loss = MARLoss(clip.tubelet_size, cfg.patch_size, clip.mean, clip.std, 1.0)(out, video, tokens, soft_target)
    loss = loss["loss"]
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
def _count(model_json: str, clip_json: str, num_visible: int) -> ModelCount:
    # Keyed on the two config sections as JSON text (the dataclasses are mutable, so not
    # hashable); the same text names the count in the disk cache.
    name = json.dumps({"model": json.loads(model_json), "clip": json.loads(clip_json), "visible": num_visible},
                      sort_keys=True)
    stored = cost_cache.load(name)
    if stored is not None:
        return ModelCount(**stored)
    fields = json.loads(model_json)
    # dataclasses.asdict flattened the sections to dicts: rebuild them.
    cfg = ModelConfig(
        **{**fields, "bridge": BridgeConfig(**fields["bridge"]), "decoder": DecoderConfig(**fields["decoder"])}
    )
    clip = ClipConfig(**json.loads(clip_json))
    count = _count_on_meta(cfg, clip, num_visible)
    cost_cache.store(name, dataclasses.asdict(count))
    return count


def count_model(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float, masking: MaskingConfig | None = None) -> ModelCount:
    """Parameters and per-clip MACs of `cfg` on clips shaped as `clip`, with `mask_ratio`
    of the tokens masked by `masking`: the tokens it keeps are the masks' own count
    (`MaskingConfig.visible`). Without a masking (or with none), round(ratio x N) tokens
    are masked, the rule of random masking, which cell running and tube masking share
    wherever their ratio masks whole units."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    masking = masking if masking is not None and masking.kind != "none" else MaskingConfig(kind="random")
    return count_visible(cfg, clip, masking.visible(token_grid(clip, cfg.patch_size), mask_ratio))


def count_visible(cfg: ModelConfig, clip: ClipConfig, visible: int) -> ModelCount:
    """Parameters and per-clip MACs of `cfg` on clips shaped as `clip` when the encoder runs
    on `visible` of their tokens.

    Counted once per shape on the meta device and cached. `cfg.arch` picks the model
    (MAR or full-token ViT); `cfg.decoder` whether MAR training runs the decoder, and its size.
    """
    n = num_tokens(clip, cfg.patch_size)
    if not 0 < visible <= n:
        raise ValueError(f"visible tokens must be in [1, {n}], got {visible}")
    # Dropout and stochastic depth cost no matmuls, and model FLOPs exclude the recomputation
    # of gradient checkpointing: they are switched off so the meta run has fewer ops.
    # Keyed on the decoder as built (None filled in from the variant), so `depth: null` and
    # the variant's depth written out are one count.
    spec = cfg.decoder_spec
    decoder = DecoderConfig(cfg.decoder.enabled, spec.embed_dim, spec.depth, spec.num_heads)
    counted = dataclasses.replace(
        cfg, drop_path=0.0, head_dropout=0.0, grad_checkpointing=0, pretrained="", pretrained_partial=False,
        decoder=decoder, attention="auto",
    )
    model_json = json.dumps(dataclasses.asdict(counted), sort_keys=True)
    return _count(model_json, json.dumps(dataclasses.asdict(clip), sort_keys=True), visible)


def training_flops_by_visible(cfg: ModelConfig, clip: ClipConfig, visible_counts) -> dict[int, int]:
    """Hardware FLOPs (2 x MACs, forward + backward) of one training clip for each number of
    visible tokens in `visible_counts`: the work of clips masked at different ratios.

    Up to three counts are counted directly. For more (a range of random-masking ratios
    covers hundreds), three are counted and the rest follow from the quadratic through
    them, which is exact: the encoder blocks and the bridging classifier cost a + b*Nv
    (matmuls) + c*Nv^2 (attention), and the decoder runs on all N tokens whatever the split.
    A clip with nothing masked skips the decoder, so it is counted on its own.
    """
    n = num_tokens(clip, cfg.patch_size)
    wanted = sorted({int(v) for v in visible_counts})
    if any(not 0 < v <= n for v in wanted):
        raise ValueError(f"visible token counts must be in [1, {n}], got {wanted}")

    def count(v: int) -> int:
        return 2 * count_visible(cfg, clip, v).macs_training

    masked = [v for v in wanted if v < n]
    if len(masked) <= 3:
        return {v: count(v) for v in wanted}
    xs = [masked[0], masked[len(masked) // 2], masked[-1]]
    ys = [Fraction(count(x)) for x in xs]
    out = {}
    for v in masked:  # Lagrange form of the quadratic through (xs, ys), in exact arithmetic
        total = Fraction(0)
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            term = yi
            for j, xj in enumerate(xs):
                if j != i:
                    term *= Fraction(v - xj, xi - xj)
            total += term
        out[v] = round(total)
    if n in wanted:
        out[n] = count(n)
    return out


def model_macs_per_clip(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float, training: bool) -> int:
    """Multiply-accumulates for one clip: the papers' "FLOPs" (ViT-B full: 180e9).

    training=False: one inference forward (encoder + classifier).
    training=True: forward (incl. the decoder for MAR) + backward.
    """
    count = count_model(cfg, clip, mask_ratio)
    return count.macs_training if training else count.macs_inference


def model_flops_per_clip(cfg: ModelConfig, clip: ClipConfig, mask_ratio: float, training: bool) -> int:
    """True hardware FLOPs for one clip (2 x MACs): the numerator of TFLOP/s and MFU."""
    return 2 * model_macs_per_clip(cfg, clip, mask_ratio, training)
