"""Video ViT encoder that runs its blocks on the visible tokens only.

Shapes: B batch, C channels, T frames, H/W pixels; T'/H'/W' the token grid
(T/tubelet, H/patch, W/patch); N = T'*H'*W' tokens in a clip, Nv visible ones, D width.
Token n is at grid position (t, y, x) with n = (t*H' + y)*W' + x (flattened Conv3d output).
The grid comes from the clip section (`marscale.core.clip.token_grid`), never recomputed here.
Tokens leave the encoder in the packed layout, [Ntot, D] (`marscale.tokens.packing`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from marscale.model.layers import Block, drop_path_rates, sincos_table
from marscale.tokens.packing import PackedTokens


class TubeletEmbed(nn.Module):
    """Conv3d over tubelets of tubelet x patch x patch pixels: [B,C,T,H,W] -> [B,N,D]."""

    def __init__(self, dim: int, patch: int, tubelet: int, in_chans: int = 3, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv3d(
            in_chans, dim, (tubelet, patch, patch), stride=(tubelet, patch, patch), device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoViTEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        grid: tuple[int, int, int],
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        tubelet_size: int = 2,
        drop_path: float = 0.0,
        final_norm: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.grid = grid
        num_tokens = grid[0] * grid[1] * grid[2]
        self.patch_embed = TubeletEmbed(embed_dim, patch_size, tubelet_size, device=device, dtype=dtype)
        # Fixed, not a parameter and not saved: VideoMAE checkpoints do not store it.
        self.register_buffer("pos_embed", sincos_table(num_tokens, embed_dim, device=device), persistent=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, dp, device=device, dtype=dtype)
            for dp in drop_path_rates(drop_path, depth)
        )
        # With mean pooling (the full-token baseline) the final norm is the head's fc_norm.
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, device=device, dtype=dtype) if final_norm else nn.Identity()
        self.grad_checkpointing = 0

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[0]

    def set_grad_checkpointing(self, n_blocks: int) -> None:
        """Recompute the activations of the first `n_blocks` blocks during backward."""
        if not 0 <= n_blocks <= len(self.blocks):
            raise ValueError(f"n_blocks must be in [0, {len(self.blocks)}], got {n_blocks}")
        self.grad_checkpointing = n_blocks

    def embed(self, video: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """video [B,C,T,H,W] -> the visible tokens of `packed` with their positions, [Ntot, D]."""
        x = self.patch_embed(video) + self.pos_embed.to(video.dtype)  # [B, N, D]
        x = x.reshape(-1, x.shape[-1])  # [B*N, D]
        return x if packed.num_masked == 0 else x[packed.flat_visible]

    def forward(self, video: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """video: [B,C,T,H,W]; packed: which tokens of each clip are visible.
        Returns the (normed) visible tokens, [Ntot, D]."""
        x = self.embed(video, packed)
        for i, block in enumerate(self.blocks):
            if i < self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, packed, use_reentrant=False)
            else:
                x = block(x, packed)
        return self.norm(x)
