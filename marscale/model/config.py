"""Model sizes and the model section of the config.

Sizes are an explicit table (`VARIANTS`), not a registry. Decoder sizes follow the MAR
reference for ViT-B/L and VideoMAE's pre-training decoders for the others.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from marscale.choices import check_choices


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
    "vit_s": Variant(EncoderSpec(384, 12, 6), DecoderSpec(192, 4, 3)),
    "vit_b": Variant(EncoderSpec(768, 12, 12), DecoderSpec(384, 4, 6)),
    "vit_l": Variant(EncoderSpec(1024, 24, 16), DecoderSpec(512, 12, 8)),
    "vit_h": Variant(EncoderSpec(1280, 32, 16), DecoderSpec(640, 4, 8)),
    # ViT-g (VideoMAE V2): patch 14, MLP ratio 48/11 (hidden 6144).
    "vit_g": Variant(EncoderSpec(1408, 40, 16, mlp_ratio=48 / 11, patch_size=14), DecoderSpec(512, 4, 8)),
}


@dataclasses.dataclass
class BridgeConfig:
    """The bridging classifier between encoder features and class scores."""

    embed_dim: int = 512
    """Width of the bridging blocks (bias-free Linear from the encoder width)."""
    depth: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""


@dataclasses.dataclass
class ModelConfig:
    """Which network to build. Maps onto the `model:` section of a YAML config.

    The clip it runs on (frames, size, tubelets, pixel statistics) is the `clip:` section
    (`marscale.clip.ClipConfig`), passed to `build_model` beside this one.
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
    decoder: bool = True
    """Run the reconstruction decoder during MAR training (auxiliary loss)."""
    bridge: BridgeConfig = dataclasses.field(default_factory=BridgeConfig)
    """Bridging classifier shape (MAR only)."""
    grad_checkpointing: int = 0
    """Number of encoder blocks (from the first) whose activations are recomputed in backward."""
    pretrained: str = ""
    """Path of a VideoMAE / MAR checkpoint to start from ("" = random init)."""
    init_scale: float = 0.001
    """Scale applied to the freshly initialised classifier Linear (VideoMAE uses 0.001)."""

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

    @property
    def patch_size(self) -> int:
        """Spatial patch size of the encoder variant."""
        return VARIANTS[self.variant].encoder.patch_size
