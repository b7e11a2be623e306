"""marscale: MAR (Masked Action Recognition) video transformers trained at cluster scale."""

from marscale.core.compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
