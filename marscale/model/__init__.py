"""MAR video ViT models: encoder, decoder, bridging classifier, full-token baseline.

Only `nn.Module`s live here; masking, losses, checkpoints and engine wrapping are applied
from outside.
"""

from marscale.model.config import VARIANTS, BridgeConfig, DecoderConfig, ModelConfig
from marscale.model.mar import MARModel, ViTClassifier, build_model

__all__ = ["VARIANTS", "BridgeConfig", "DecoderConfig", "ModelConfig", "MARModel", "ViTClassifier", "build_model"]
