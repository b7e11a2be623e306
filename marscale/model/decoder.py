"""Reconstruction decoder: predicts the pixels of masked tubelets from visible tokens.

Shapes: B batch, N tokens per clip, Ntot visible tokens of the batch (packed), Mtot masked
ones, D encoder width, Dd decoder width, P values per tubelet (`marscale.core.clip.tubelet_values`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

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

    def forward(self, visible: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """visible: encoder output [Ntot, D]. Every clip's N positions run as one rectangular
        row, its visible tokens then its masked ones (`packed.order`: VideoMAE's
        visible-then-masked layout; positions from the table only). Returns predictions for
        the masked tokens, packed: [Mtot, P] in `packed.masked_slots` order."""
        x = self.encoder_to_decoder(visible)  # [Ntot, Dd]
        B, N = packed.order.shape
        # Row b, slot j: packed token cu[b] + j while j < Nv_b, else the mask token (row Ntot).
        starts = packed.cu_seqlens[:-1].to(torch.long).unsqueeze(1)
        slots = torch.arange(N, device=x.device).unsqueeze(0)
        source = torch.where(packed.masked_slots, x.shape[0], starts + slots)  # [B, N]
        # index_select, not x[source]: the mask token is read by every masked slot, and
        # advanced indexing's backward sums those reads with atomic adds on a multi-threaded
        # CPU (another order each run); index_select's backward sums them in index order.
        rows = torch.cat((x, self.mask_token.to(x.dtype).view(1, -1))).index_select(0, source.flatten())
        rows = rows.view(B, N, -1)  # [B, N, Dd]
        x = (rows + self.pos_embed.to(x.dtype)[packed.order]).flatten(0, 1)  # [B*N, Dd]
        every_token = packed.every_token  # B clips of N tokens: the rectangular fast path
        for block in self.blocks:
            x = block(x, every_token)
        return self.head(self.norm(x[packed.masked_rows]))
