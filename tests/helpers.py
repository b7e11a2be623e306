"""Pieces the tests share: the tiny model and clip shape, a run's overrides of
configs/demo.yaml, and the environment of a child process (launcher or plain CLI)."""

from __future__ import annotations

import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")

# 32x32 clips of 4 frames: a 2x2x2 token grid (4 visible at 50%), fast on a CPU.
TINY_CLIPS = (
    "clip.img_size=32",
    "clip.num_frames=4",
    "data.short_side=32",
)


def run_overrides(shards: dict[str, str], out) -> list[str]:
    """configs/demo.yaml on `shards`, writing to `out`, with tiny clips and no TensorBoard."""
    return [
        f"data.train_shards={shards['train']}",
        f"data.val_shards={shards['val']}",
        f"run.output_dir={out}",
        *TINY_CLIPS,
        "logging.tensorboard=false",
    ]


def subprocess_env(one_thread: bool = True) -> dict[str, str]:
    """This environment for a child process: the repository importable, no inherited
    rank variables, and `deepspeed` / `torchrun` found beside this interpreter even when
    its environment is not activated (make test). one_thread: OMP_NUM_THREADS=1, for
    two ranks on two cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def tiny_clip(**kw):
    """32x32 clips of 4 frames (the TINY_CLIPS shape); `kw` overrides any field."""
    from marscale.core.clip import ClipConfig

    return ClipConfig(**{"num_frames": 4, "img_size": 32, **kw})


def tiny_model_config(arch: str = "mar", **kw):
    """vit_tiny (for `tiny_clip()` clips), deterministic layers (no drop path / dropout),
    head init 1.0 and a small bridge; `kw` overrides any field."""
    from marscale.model import BridgeConfig, ModelConfig

    fields = dict(
        num_classes=5,
        arch=arch,
        variant="vit_tiny",
        drop_path=0.0,
        head_dropout=0.0,
        init_scale=1.0,
        bridge=BridgeConfig(embed_dim=64, depth=2, num_heads=4),
    )
    fields.update(kw)
    return ModelConfig(**fields)


def count_standard(variant: str, ratio: float, num_classes: int = 400):
    """`marscale.cost.counting.count_model` of a size at the standard 16 x 224 x 224 clip: the
    full-token ViT at ratio 0, MAR otherwise (as the rows of `marscale cost`)."""
    from marscale.cost import counting as cost
    from marscale.core.clip import ClipConfig
    from marscale.model import ModelConfig

    model = ModelConfig(num_classes=num_classes, arch="vit" if ratio == 0 else "mar", variant=variant)
    return cost.count_model(model, ClipConfig(), ratio)


def tokens_of(visible_idx, num_tokens: int):
    """The packed token layout (`PackedTokens`) of clips whose visible tokens are the rows of
    `visible_idx` [B, Nv] (any order; the layout holds them ascending)."""
    import torch

    from marscale.tokens.packing import pack_mask

    mask = torch.ones(visible_idx.shape[0], num_tokens, dtype=torch.bool)
    mask.scatter_(1, visible_idx, False)
    return pack_mask(mask)


def rows_of(x):
    """A rectangular [B, N, D] batch as the packed layout's [B*N, D] rows and their layout."""
    from marscale.tokens.packing import PackedTokens

    return x.reshape(-1, x.shape[-1]), PackedTokens.full(x.shape[0], x.shape[1])


def readme_block(name: str) -> str:
    """The fenced code block of README.md that follows the marker `<!-- NAME -->`: commands
    tests run as written."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    found = re.search(rf"<!-- {re.escape(name)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert found, f"README.md has no block marked <!-- {name} -->"
    return found.group(1)


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block, one per entry (backslash continuations joined)."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]


def fresh_shell_env(*prefix: str) -> dict[str, str]:
    """A login-like environment with no virtual environment on PATH (`prefix` folders
    first), as a user's new shell has."""
    path = os.pathsep.join([*prefix, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": path, "LANG": "C.UTF-8", "USER": os.environ.get("USER", "root")}


def load_benchmark(name: str, module_name: str | None = None):
    """benchmarks/NAME.py (a script, not a package) as a module, registered in sys.modules
    under `module_name` (default NAME): its dataclasses look their module up there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name or name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
