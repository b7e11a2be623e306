"""Transformer building blocks shared by the encoder, decoder and bridging classifier.

Shapes: Ntot tokens of a batch in the packed layout (`marscale.tokens.packing`), D width,
h heads. Blocks take tokens as [Ntot, D] with the batch's `PackedTokens`, which says which
clip each row belongs to.
Switched-off features (drop path 0, no q/v bias) are `nn.Identity` or None, not branches.

Each piece here was measured against timm's (`timm.layers`): drop path, the drop-path
schedule and the weight init give different numbers there (see each one's comment), and
seeded runs must reproduce. The MLP gives the same numbers as `timm.layers.Mlp` (tested)
but stays a ten-line copy: importing timm pulls in torchvision, and the model must import
with PyTorch alone (the GPU benchmark runs on machines that have nothing else).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from marscale.model.attention import PackedAttention
from marscale.tokens.packing import PackedTokens


def sincos_table(num_positions: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 1-D sin-cos position table [num_positions, dim], as in VideoMAE.

    Position p, channel j: angle p / 10000^(2*(j//2)/dim); sin on even j, cos on odd j.
    VideoMAE checkpoints do not store this table, so it must match exactly.
    """
    pos = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, device=device)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)[None, :]
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    Not `timm.layers.DropPath`: it draws the same Bernoulli mask but scales by a rounded
    reciprocal, `x * (mask / keep)`, where this computes `x * mask / keep`. On CPU the two
    differ in the last bit for 8-60% of the elements (float32 and bfloat16, drop rates 0.05
    to 0.7; equal only where 1/keep is exact, as for 0.5), so seeded runs would change.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """x: [Ntot, D]; a sample is a clip of `packed` (one draw per clip, in clip order:
        the draws of a [B, Nv, D] batch)."""
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(packed.batch).bernoulli_(keep)[packed.clip_ids].unsqueeze(1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (VideoMAE's keys `mlp.fc1`, `mlp.fc2`)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    qkv is one bias-free Linear plus separate learnable q and v biases (k has no bias),
    the VideoMAE layout, so its checkpoints load without conversion.

    Each token attends within its clip (`packed`) through the model's `PackedAttention`
    (the kernel chosen once, when the model is built: `set_attention`).
    """

    def __init__(self, dim: int, num_heads: int, qv_bias: bool = True, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False, device=device, dtype=dtype)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
            self.v_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.attend = PackedAttention()

    def forward(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """x: [Ntot, D], the clips of `packed` one after another -> [Ntot, D]."""
        N, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(N, 3, self.num_heads, D // self.num_heads).unbind(1)  # [Ntot, h, d] each
        return self.proj(self.attend(q, k, v, packed).reshape(N, D))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, GELU MLP, stochastic depth)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qv_bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.attn = Attention(dim, num_heads, qv_bias, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """x: [Ntot, D] -> [Ntot, D]."""
        x = x + self._drop(self.attn(self.norm1(x), packed), packed)
        return x + self._drop(self.mlp(self.norm2(x)), packed)

    def _drop(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        # Stochastic depth drops per clip, not per row.
        return self.drop_path(x, packed) if isinstance(self.drop_path, DropPath) else x


def set_attention(module: nn.Module, name: str, device: torch.device | str) -> None:
    """Resolve `model.attention` for `device` once and give every block's attention that kernel."""
    attend = PackedAttention(name, device)
    for m in module.modules():
        if isinstance(m, Attention):
            m.attend = attend


def scale_head(head: nn.Linear, init_scale: float) -> None:
    """VideoMAE's head init: the final Linear's weight and bias multiplied by `init_scale`."""
    with torch.no_grad():
        head.weight.mul_(init_scale)
        head.bias.mul_(init_scale)


def init_weights(module: nn.Module) -> None:
    """timm/VideoMAE init: truncated-normal(0.02) Linear, unit LayerNorm, zero biases.

    torch's `trunc_normal_`, not `timm.layers.trunc_normal_`: timm's (and torch < 2.12's)
    maps uniform draws through erfinv, torch >= 2.12 draws normals and rejects the few
    outside [a, b]. Same distribution, different numbers from the same seed; timm's would
    change the initial weights of seeded runs on the torch this project installs. It is
    also worse here: with std 0.02 and bounds +-2 (100 std), a uniform draw of exactly -1
    becomes erfinv(-1) = -inf, clamped to -2.0 (5 such weights in 86M draws, ViT-B's count).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d):
            # Initialise like a Linear over the flattened tubelet (as MAE/VideoMAE do).
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def xavier_init(module: nn.Module) -> None:
    """The MAR reference's head init: xavier-uniform Linear weights, zero biases (q/v biases
    included: the reference's qkv Linear has a plain bias, set to 0), unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Attention) and m.q_bias is not None:
            nn.init.zeros_(m.q_bias)
            nn.init.zeros_(m.v_bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth increasing linearly from 0 to `rate` over `depth` blocks.

    Not `timm.layers.calculate_drop_path_rates`: that rounds the rates through a float32
    `torch.linspace` (0.1 over 12 blocks: off by up to 5e-9, which changes the drop-path
    scale 1/keep), and gives [0.0] instead of [rate] for a single block.
    """
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]


