"""Reconstruction decoder: predicts the pixels of masked tubelets from visible tokens.

Shapes: B batch, Nv visible and Nm masked tokens (Nv + Nm = N), D encoder width,
Dd decoder width, P = 3 * tubelet * patch * patch values per tubelet.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from marscale.model.encoder import gather_tokens
from marscale.model.layers import Block, sincos_table
from marscale.tokens.packing import PackedTokens


class ReconstructionDecoder(nn.Module):
    def __init__(
        self,
        encoder_dim: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_tokens: int,
        out_dim: int,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.encoder_to_decoder = nn.Linear(encoder_dim, embed_dim, bias=False, device=device, dtype=dtype)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim, device=device, dtype=dtype))
        self.register_buffer("pos_embed", sincos_table(num_tokens, embed_dim, device=device), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, device=device, dtype=dtype) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, device=device, dtype=dtype)
        self.head = nn.Linear(embed_dim, out_dim, device=device, dtype=dtype)

    def forward(self, visible: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        """visible: [B, Nv, D] encoder output; visible_idx: [B, Nv]; masked_idx: [B, Nm].
        Returns predictions for the masked tokens, in `masked_idx` order: [B, Nm, P]."""
        x = self.encoder_to_decoder(visible)  # [B, Nv, Dd]
        B, Nm = masked_idx.shape
        pos = self.pos_embed.to(x.dtype).expand(B, -1, -1)
        x_vis = x + gather_tokens(pos, visible_idx)
        x_mask = self.mask_token.to(x.dtype) + gather_tokens(pos, masked_idx)
        # Order visible-then-masked (as VideoMAE); positions come from the table only.
        x = torch.cat((x_vis, x_mask), dim=1)  # [B, N, Dd]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -Nm:]))

    def forward_packed(self, visible: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """visible: packed encoder output [1, Ntot, D]. Every clip's N positions run as one
        rectangular row, visible tokens then masked ones (`packed.order`, the layout of
        `forward`). Returns predictions for the masked tokens, packed: [Mtot, P] in
        `packed.masked_slots` order."""
        x = self.encoder_to_decoder(visible)[0]  # [Ntot, Dd]
        B, N = packed.order.shape
        # Row b, slot j: packed token cu[b] + j while j < Nv_b, else the mask token (row Ntot).
        starts = packed.cu_seqlens[:-1].to(torch.long).unsqueeze(1)
        slots = torch.arange(N, device=x.device).unsqueeze(0)
        source = torch.where(packed.masked_slots, x.shape[0], starts + slots)  # [B, N]
        rows = torch.cat((x, self.mask_token.to(x.dtype).view(1, -1)))[source]  # [B, N, Dd]
        pos = self.pos_embed.to(x.dtype)[packed.order]  # [B, N, Dd]
        x = rows + pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[packed.masked_slots]))
