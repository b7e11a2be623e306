"""The one token layout: the visible tokens of a batch of clips, concatenated into one
sequence with no padding, whatever number each clip keeps.

Every batch the model sees is described by a `PackedTokens`: clips masked at one ratio
(every clip keeps Nv tokens: the layout is `uniform`, and attention runs it as one
rectangular [B, h, Nv, d] call), clips masked at their own ratios, and clips with every
token visible (`PackedTokens.full`). Model, attention and loss have no second path.

Shapes: B clips, N tokens per clip, Nv_b visible tokens of clip b, Ntot = sum_b Nv_b,
Mtot = sum_b (N - Nv_b) masked tokens.

A `PackedTokens` is built on the host from a bool mask [B, N] (True = masked, as in
masking.py) by `pack_mask`, and moved to the device once per micro-batch. It carries
what every attention backend needs (`cu_seqlens`, `max_seqlen`, per-token clip ids) and
what the model and the loss need to go from the packed sequence back to clips:

- the encoder gathers the visible tokens of [B*N] flattened token rows (`flat_visible`);
- the bridging classifier mean-pools per clip (`clip_ids`, `lengths`);
- the reconstruction decoder runs on every position of every clip, so its input is
  rectangular again: row b holds clip b's visible tokens then its masked ones, both in
  ascending token order (`order` [B, N], VideoMAE's visible-then-masked layout), and the
  predictions of the masked slots are read back packed ([Mtot, P], `masked_slots`);
- the loss gathers the same masked tokens of the clip (`flat_masked`).

The lengths are Python ints (known on the host when the mask is made), so nothing here
needs a device-to-host sync.

Token tensors that flow through the model with this layout are [Ntot, D]: row i is packed
token i (for a uniform layout, a [B, Nv, D] batch viewed flat).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


@dataclasses.dataclass(frozen=True)
class PackedTokens:
    num_tokens: int
    """N, tokens per clip."""
    lengths: tuple[int, ...]
    """Visible tokens of each clip (Nv_b), host ints."""
    visible_idx: torch.Tensor
    """int64 [Ntot]: each packed token's index in its clip, clip after clip, ascending."""
    clip_ids: torch.Tensor
    """int64 [Ntot]: the clip each packed token belongs to."""
    cu_seqlens: torch.Tensor
    """int32 [B + 1]: where each clip's tokens start in the packed sequence (0, ..., Ntot)."""
    order: torch.Tensor
    """int64 [B, N]: per clip, the visible token indices ascending, then the masked ones."""
    masked_slots: torch.Tensor
    """bool [B, N]: which slots of `order` hold masked tokens (slot j >= Nv_b)."""
    masked_clip_ids: torch.Tensor
    """int64 [Mtot]: the clip of each masked token, in `masked_slots` order."""
    masked_idx: torch.Tensor
    """int64 [Mtot]: each masked token's index in its clip, in `masked_slots` order."""
    masked_rows: torch.Tensor
    """int64 [Mtot]: the masked slots as rows of the [B*N] flattened `order` (an index, so
    reading them needs no boolean indexing: shapes are known without the data)."""

    @functools.cached_property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """Runs of consecutive clips of equal length: (first token, clips, length) each.
        Attention can batch a run as one rectangular call; batches whose ratios are drawn
        in sorted order (`marscale.tokens.batches`) have one run per distinct ratio."""
        runs, start = [], 0
        for n in self.lengths:
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
            start += n
        return tuple(tuple(r) for r in runs)

    @functools.cached_property
    def uniform(self) -> bool:
        """True when every clip keeps the same number of tokens (one run): a [Ntot, ...] tensor
        is then a [B, Nv, ...] batch viewed flat, and attention takes the rectangular fast path."""
        return len(self.runs) == 1

    @functools.cached_property
    def every_token(self) -> "PackedTokens":
        """The same clips with every token visible (the decoder's rows), built once per batch."""
        return PackedTokens.full(self.batch, self.num_tokens, self.order.device)

    @functools.cached_property
    def block_mask(self) -> torch.Tensor:
        """bool [Ntot, Ntot]: True where two tokens belong to one clip (built once per batch)."""
        return self.clip_ids[:, None] == self.clip_ids[None, :]

    @functools.cached_property
    def flex_block_mask(self) -> BlockMask:
        """FlexAttention's block-sparse form of `block_mask` (a token attends within its clip),
        on `clip_ids`' device. Built once per batch, when the first layer asks: every layer
        of the forward (and a recomputing backward) reuses it."""
        ids = self.clip_ids

        def same_clip(b, h, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]

        n = ids.shape[0]
        return create_block_mask(same_clip, None, None, n, n, device=ids.device)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        """Ntot, visible tokens in the batch."""
        return sum(self.lengths)

    @property
    def num_masked(self) -> int:
        """Mtot, masked tokens in the batch."""
        return self.batch * self.num_tokens - self.total

    @property
    def flat_visible(self) -> torch.Tensor:
        """int64 [Ntot]: rows of the [B*N] flattened tokens that are visible, packed order."""
        return self.clip_ids * self.num_tokens + self.visible_idx

    @property
    def flat_masked(self) -> torch.Tensor:
        """int64 [Mtot]: rows of the [B*N] flattened tokens that are masked, `masked_slots` order."""
        return self.masked_clip_ids * self.num_tokens + self.masked_idx

    def to(self, device, non_blocking: bool = False) -> "PackedTokens":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    @classmethod
    def full(cls, batch: int, num_tokens: int, device=None) -> "PackedTokens":
        """Every token of `batch` clips visible, built on `device` directly (no host copy)."""
        tokens = torch.arange(num_tokens, device=device)
        clips = torch.arange(batch, device=device)
        empty = torch.empty(0, dtype=torch.long, device=device)
        return cls(
            num_tokens=num_tokens,
            lengths=(num_tokens,) * batch,
            visible_idx=tokens.repeat(batch),
            clip_ids=clips.repeat_interleave(num_tokens),
            cu_seqlens=torch.arange(0, batch * num_tokens + 1, num_tokens, dtype=torch.int32, device=device),
            order=tokens.expand(batch, num_tokens),
            masked_slots=torch.zeros(batch, num_tokens, dtype=torch.bool, device=device),
            masked_clip_ids=empty,
            masked_idx=empty,
            masked_rows=empty,
        )

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[Ntot, ...] -> per clip [Nv_b, ...] (views, no copy)."""
        return list(torch.split(x, list(self.lengths), dim=0))


def pack_mask(mask: torch.Tensor) -> PackedTokens:
    """bool mask [B, N] (True = masked; any number per clip, at least one visible token)
    -> PackedTokens (on the mask's device)."""
    if mask.ndim != 2:
        raise ValueError(f"expected a mask [B, N], got shape {tuple(mask.shape)}")
    B, N = mask.shape
    visible = ~mask
    lengths = visible.sum(dim=1).tolist()  # the mask is on the host: no device sync
    if min(lengths) < 1:
        raise ValueError("every clip must keep at least one visible token")
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, ascending
    rows, cols = visible.nonzero(as_tuple=True)  # row-major: clip after clip, ascending tokens
    slots = torch.arange(N, device=mask.device).expand(B, N)
    masked_slots = slots >= torch.tensor(lengths, device=mask.device).unsqueeze(1)
    masked_rows = torch.arange(B, device=mask.device).unsqueeze(1).expand(B, N)[masked_slots]
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.tensor(lengths, device=mask.device).cumsum(0)
    return PackedTokens(
        num_tokens=N,
        lengths=tuple(int(n) for n in lengths),
        visible_idx=cols,
        clip_ids=rows,
        cu_seqlens=cu,
        order=order,
        masked_slots=masked_slots,
        masked_clip_ids=masked_rows,
        masked_idx=order[masked_slots],
        masked_rows=masked_slots.flatten().nonzero().squeeze(1),
    )
