"""Video data: sharded WebDataset loaders, frame sampling, clip augmentation, mixup.

Importing this package is cheap (only the config dataclass); the loaders, decoders and
timm-based transforms are imported on first use of their names::

    from marscale.data import DataConfig, build_train_loader, build_eval_loader

`SSV2_FLIP_LABEL_PAIRS` holds the Something-Something v2 classes a horizontal flip swaps.
"""

from __future__ import annotations

import importlib

from marscale.data.config import SSV2_FLIP_LABEL_PAIRS, DataConfig

_LAZY = {
    "build_train_loader": "loaders",
    "build_eval_loader": "loaders",
    "start_iterator": "loaders",
    "TrainLoader": "loaders",
    "EvalLoader": "loaders",
    "normalize": "mixup",
    "VideoMixup": "mixup",
    "build_mixup": "mixup",
    "available_decoders": "decode",
    "resolve_decoder": "decode",
}

__all__ = ["DataConfig", "SSV2_FLIP_LABEL_PAIRS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"marscale.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'marscale.data' has no attribute {name!r}")
