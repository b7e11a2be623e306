"""Model sizes and the model section of the config.

Sizes are an explicit table (`VARIANTS`), not a registry. Decoder sizes follow the MAR
reference for ViT-B/L and VideoMAE's pre-training decoders for the others.
"""

from __future__ import annotations

import dataclasses


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
    """Which network to build. Maps onto the `model:` section of a YAML config."""

    num_classes: int
    """Number of output classes (400 for Kinetics-400, 174 for SSv2)."""
    arch: str = "mar"
    """`mar` (encoder on visible tokens + decoder + bridging classifier) or `vit`
    (the standard full-token fine-tuning baseline: mean pool, fc_norm, Linear)."""
    variant: str = "vit_b"
    """Encoder size, a key of `VARIANTS`."""
    img_size: int = 224
    """Input frame size (square)."""
    num_frames: int = 16
    """Frames per clip."""
    tubelet_size: int = 2
    """Frames per tubelet (temporal patch size)."""
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
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Mean the input was normalised with (used to un-normalise the reconstruction target)."""
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Std the input was normalised with."""

    def __post_init__(self):
        if self.arch not in ("mar", "vit"):
            raise ValueError(f"model.arch must be 'mar' or 'vit', got {self.arch!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant {self.variant!r} unknown; choose one of {sorted(VARIANTS)}")
        patch = VARIANTS[self.variant].encoder.patch_size
        if self.img_size % patch:
            raise ValueError(f"model.img_size {self.img_size} is not a multiple of the patch size {patch}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"model.num_frames {self.num_frames} is not a multiple of model.tubelet_size {self.tubelet_size}"
            )
        if self.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1")
        if not 0 <= self.grad_checkpointing <= VARIANTS[self.variant].encoder.depth:
            raise ValueError(
                f"model.grad_checkpointing must be in [0, {VARIANTS[self.variant].encoder.depth}] for {self.variant}"
            )

    @property
    def patch_size(self) -> int:
        return VARIANTS[self.variant].encoder.patch_size

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(T', H', W'): tokens along time, height and width."""
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w
