"""Keep `import timm` working on CPU-only machines.

The single place that handles the torchvision problem (see README, "CPU-only machines").

PyPI's torchvision wheel is built against CUDA torch. Beside the CPU build of torch its
compiled extension cannot load; torchvision then still registers fake kernels for its
``nms``/``qnms`` operators, whose schemas only the extension defines, and ``import
torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. Since
``import timm`` imports torchvision, timm becomes unusable too.

marscale only needs torchvision's pure-Python parts (through timm's transforms). When -
and only when - torch is a CPU build and torchvision's extension fails to load, we
declare the two operator schemas without kernels so the import succeeds. Calling a
torchvision op then raises torchvision's own "Couldn't load custom C++ ops" error. On a
normal install (CUDA torch, or a matching torchvision) this function changes nothing.
"""

import glob
import importlib.util
import os

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the schema definitions alive for the life of the process


def _op_defined(name: str) -> bool:
    return torch._C._dispatch_has_kernel(f"torchvision::{name}") or bool(
        torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")
    )


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` (and so ``import timm``) work beside CPU torch.

    Returns True when the operator schemas had to be declared.
    """
    global _library
    if _library is not None or torch.version.cuda is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _op_defined("nms"):
        return False
    for lib_path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(lib_path)
            return False  # the extension works: nothing to do
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _library.define(schema)
    return True
