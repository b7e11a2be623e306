"""Model sizes and the model section of the config.

Sizes are an explicit table (`VARIANTS`), not a registry. Decoder sizes are the ones
VideoMAE pre-trained each size with (the MAR reference uses the same for ViT-B/L), so a
VideoMAE pre-training checkpoint's decoder loads whole; `model.decoder` overrides them for
checkpoints pre-trained with another decoder.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from marscale.core.choices import check_choices
from marscale.model.attention import AttentionBackend


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    embed_dim: int
    depth: int
    num_heads: int


@dataclasses.dataclass(frozen=True)
class Variant:
    encoder: EncoderSpec
    decoder: DecoderSpec


VARIANTS: dict[str, Variant] = {
    # vit_tiny exists for CPU demos and tests; it is not a published size.
    "vit_tiny": Variant(EncoderSpec(192, 6, 3), DecoderSpec(96, 2, 3)),
    # vit_micro: the smaller full-token model of the CPU experiment in miniature
    # (benchmarks/compare_mini.py); not a published size either.
    "vit_micro": Variant(EncoderSpec(128, 4, 2), DecoderSpec(64, 1, 2)),
    "vit_s": Variant(EncoderSpec(384, 12, 6), DecoderSpec(192, 4, 3)),
    "vit_b": Variant(EncoderSpec(768, 12, 12), DecoderSpec(384, 4, 6)),
    "vit_l": Variant(EncoderSpec(1024, 24, 16), DecoderSpec(512, 12, 8)),
    # VideoMAE's ViT-H pre-training script passes --decoder_depth 12 (its default is 4).
    "vit_h": Variant(EncoderSpec(1280, 32, 16), DecoderSpec(640, 12, 8)),
    # ViT-g (VideoMAE V2): patch 14, MLP ratio 48/11 (hidden 6144).
    "vit_g": Variant(EncoderSpec(1408, 40, 16, mlp_ratio=48 / 11, patch_size=14), DecoderSpec(512, 4, 8)),
}


@dataclasses.dataclass
class DecoderConfig:
    """The reconstruction decoder (MAR only). Its size defaults to the variant's row of
    `VARIANTS`, the decoder VideoMAE pre-trained that size with; set a field when the
    checkpoint in `model.pretrained` was pre-trained with another decoder (loading checks
    depth and width against the file and names the value to set)."""

    # `decoder: true/false` was a bool before it became this section: it means `enabled`.
    MOVED_SCALAR: ClassVar[str] = "enabled"

    enabled: bool = True
    """Run the decoder during MAR training (the auxiliary reconstruction loss)."""
    embed_dim: int | None = None
    """Decoder width (None = the variant's)."""
    depth: int | None = None
    """Number of decoder blocks (None = the variant's: 12 for ViT-L and ViT-H)."""
    num_heads: int | None = None
    """Attention heads per decoder block (None = the variant's). A checkpoint does not
    record this (the weights have the same shapes for any head count): take it from the
    pre-training script."""

    def __post_init__(self):
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.decoder.{name} must be >= 1 (or null for the variant's), got {value}")


@dataclasses.dataclass
class BridgeConfig:
    """The bridging classifier between encoder features and class scores."""

    embed_dim: int = 512
    """Width of the bridging blocks (bias-free Linear from the encoder width)."""
    depth: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    init: Literal["xavier", "trunc_normal"] = "trunc_normal"
    """How the fresh classifier starts. `xavier`, the MAR reference: xavier-uniform weights
    for every Linear of the blocks and of the final head, zero biases, unit LayerNorms, no
    down-scaling of the head (`model.init_scale` does not apply); the bias-free input Linear
    keeps PyTorch's default Linear init, as the reference's `encoder_to_cls_decoder` does.
    `trunc_normal` (the default, marscale's earlier init): VideoMAE's head init,
    truncated-normal(0.02) for every Linear, zero biases, and the final Linear scaled by
    `model.init_scale`. The MAR presets set `xavier`."""

    def __post_init__(self):
        check_choices(self)


@dataclasses.dataclass
class ModelConfig:
    """Which network to build. Maps onto the `model:` section of a YAML config.

    The clip it runs on (frames, size, tubelets, pixel statistics) is the `clip:` section
    (`marscale.core.clip.ClipConfig`), passed to `build_model` beside this one.
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "img_size": "clip.img_size",
        "num_frames": "clip.num_frames",
        "tubelet_size": "clip.tubelet_size",
        "pixel_mean": "clip.mean",
        "pixel_std": "clip.std",
    }

    num_classes: int
    """Number of output classes (400 for Kinetics-400, 174 for SSv2)."""
    arch: Literal["mar", "vit"] = "mar"
    """`mar` (encoder on visible tokens + decoder + bridging classifier) or `vit`
    (the standard full-token fine-tuning baseline: mean pool, fc_norm, Linear)."""
    variant: str = "vit_b"
    """Encoder size, a key of `VARIANTS` (the table is the one list of sizes)."""
    drop_path: float = 0.1
    """Stochastic depth rate, linearly increasing over encoder blocks."""
    head_dropout: float = 0.5
    """Dropout before the final Linear of the classifier."""
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    """Reconstruction decoder: on/off and its size (MAR only)."""
    bridge: BridgeConfig = dataclasses.field(default_factory=BridgeConfig)
    """Bridging classifier shape (MAR only)."""
    grad_checkpointing: int = 0
    """Number of encoder blocks (from the first) whose activations are recomputed in backward."""
    attention: AttentionBackend = "auto"
    """Attention backend for packed batches (clips with different numbers of visible tokens,
    `marscale.model.attention`): auto, flash_varlen, torch_varlen, flex, sdpa_mask or
    per_clip. `auto` picks flash_varlen > torch_varlen > flex on CUDA and per_clip on CPU
    (measured faster than sdpa_mask there). One asked for that cannot run is an error."""
    pretrained: str = ""
    """Weights to start from ("" = random init): a VideoMAE / MAR / marscale checkpoint file
    (.pth/.pt, or .safetensors), a model folder (transformers' `save_pretrained` or a Hub
    download: config.json + model.safetensors or pytorch_model.bin; `marscale export`'s), or
    `hf:ORG/NAME`, a model in the local Hugging Face cache (`hf:MCG-NJU/videomae-base`)."""
    pretrained_partial: bool = False
    """Load what fits of `pretrained` and start the rest from its initialisation. Off, a
    checkpoint must fit the model whole: missing encoder weights, and weights of the
    model's own modules that do not fit (another decoder depth or width, an extra block),
    are errors that name the setting to change. A classifier head for another label set
    is dropped (and reported) either way."""
    init_scale: float = 0.001
    """Scale applied to the freshly initialised classifier Linear (VideoMAE uses 0.001): the
    full-token baseline's head, and MAR's with `bridge.init: trunc_normal`."""

    def __post_init__(self):
        check_choices(self)
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant {self.variant!r} unknown; choose one of {sorted(VARIANTS)}")
        if self.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1")
        if not 0 <= self.grad_checkpointing <= VARIANTS[self.variant].encoder.depth:
            raise ValueError(
                f"model.grad_checkpointing must be in [0, {VARIANTS[self.variant].encoder.depth}] for {self.variant}"
            )
        if not isinstance(self.decoder, DecoderConfig):
            raise TypeError(
                f"model.decoder is a section, got {self.decoder!r}; use DecoderConfig(enabled=...) "
                f"(in YAML: model.decoder.enabled)"
            )
        spec = self.decoder_spec
        if spec.embed_dim % spec.num_heads:
            raise ValueError(
                f"model.decoder: width {spec.embed_dim} is not divisible by {spec.num_heads} heads; "
                f"set model.decoder.num_heads to the pre-training decoder's"
            )

    @property
    def decoder_spec(self) -> DecoderSpec:
        """The decoder's size: `model.decoder`'s fields, the variant's where they are None."""
        table, d = VARIANTS[self.variant].decoder, self.decoder
        return DecoderSpec(
            table.embed_dim if d.embed_dim is None else d.embed_dim,
            table.depth if d.depth is None else d.depth,
            table.num_heads if d.num_heads is None else d.num_heads,
        )

    @property
    def patch_size(self) -> int:
        """Spatial patch size of the encoder variant."""
        return VARIANTS[self.variant].encoder.patch_size
