"""Classifier heads: MAR's bridging classifier and the full-token baseline head.

Shapes: B batch, Ntot visible tokens of the batch in the packed layout, D encoder width,
K classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from marscale.model.layers import Block, init_weights, scale_head, xavier_init
from marscale.tokens.packing import PackedTokens


def mean_pool(x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
    """Mean over each clip's tokens: [Ntot, D] -> [B, D]."""
    if packed.uniform:  # a [B, Nv, D] batch viewed flat
        return x.view(packed.batch, -1, x.shape[-1]).mean(dim=1)
    sums = x.new_zeros(packed.batch, x.shape[-1]).index_add_(0, packed.clip_ids, x)
    counts = packed.cu_seqlens.diff().to(x.dtype)  # tokens per clip, already on the device
    return sums / counts.unsqueeze(1)


class ClassifierHead(nn.Module):
    """Mean pool -> LayerNorm (fc_norm) -> dropout -> Linear: [Ntot, D] -> [B, K]."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        return self.head(self.dropout(self.fc_norm(mean_pool(x, packed))))


class BridgingClassifier(nn.Module):
    """Bridges reconstruction-trained encoder features to class scores.

    Bias-free Linear D -> Db, `depth` transformer blocks on the visible tokens only (no
    position table, no mask tokens), then the mean-pool head.
    """

    def __init__(
        self,
        encoder_dim: int,
        num_classes: int,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, embed_dim, bias=False, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, device=device, dtype=dtype) for _ in range(depth))
        self.head = ClassifierHead(embed_dim, num_classes, dropout, device=device, dtype=dtype)

    def reset_parameters(self, init: str, init_scale: float) -> None:
        """Fresh weights (`BridgeConfig.init`). `xavier`, the MAR reference: its head
        (`TransformerBridgingClsHead`) applies xavier-uniform / zero bias / unit norm to its
        blocks and final Linear, with no scaling; its input Linear (`encoder_to_cls_decoder`)
        lives outside the head and keeps PyTorch's default init. `trunc_normal`: VideoMAE's
        init for every Linear, the final one scaled by `init_scale`."""
        if init == "xavier":
            self.embed.reset_parameters()
            xavier_init(self.blocks)
            xavier_init(self.head)
        else:
            init_weights(self)
            scale_head(self.head.head, init_scale)

    def forward(self, x: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """x: encoder tokens [Ntot, D] -> logits [B, K]."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, packed)
        return self.head(x, packed)
