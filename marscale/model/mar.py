"""MAR and the full-token baseline, assembled from the encoder, decoder and heads.

Shapes: B batch, C/T/H/W the clip, N tokens per clip, Nv visible, Nm masked, K classes.
`visible_idx` [B, Nv] and `masked_idx` [B, Nm] hold token indices (see masking.py);
together they cover all N tokens of each clip. Clips that keep different numbers of tokens
run packed instead (`packed`, a `marscale.tokens.packing.PackedTokens`): the encoder and the
bridging classifier on one sequence of Ntot tokens without padding, the decoder on
rectangular [B, N] rows again; predictions of masked tokens come back packed [Mtot, P].

The models return predictions only; the losses and the reconstruction target are built
where the loss is computed (`marscale.engine.loss`), from the clip the model saw.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from marscale.core.clip import ClipConfig, token_grid
from marscale.model.config import VARIANTS, ModelConfig
from marscale.model.decoder import ReconstructionDecoder
from marscale.model.encoder import VideoViTEncoder
from marscale.model.heads import BridgingClassifier, ClassifierHead
from marscale.model.layers import init_weights, set_attention_backend
from marscale.tokens.packing import PackedTokens


def _build_encoder(cfg: ModelConfig, clip: ClipConfig, final_norm: bool, device, dtype) -> VideoViTEncoder:
    spec = VARIANTS[cfg.variant].encoder
    token_grid(clip, spec.patch_size)  # the clip must cut into whole patches
    return VideoViTEncoder(
        spec.embed_dim,
        spec.depth,
        spec.num_heads,
        spec.mlp_ratio,
        spec.patch_size,
        clip.tubelet_size,
        clip.img_size,
        clip.num_frames,
        cfg.drop_path,
        final_norm=final_norm,
        device=device,
        dtype=dtype,
    )


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())  # shapes only: nothing to initialise


def _init(model: nn.Module, head: nn.Linear, init_scale: float) -> None:
    if _on_meta(model):
        return
    init_weights(model)
    with torch.no_grad():
        head.weight.mul_(init_scale)
        head.bias.mul_(init_scale)


class MARModel(nn.Module):
    """Encoder on visible tokens + reconstruction decoder + bridging classifier."""

    def __init__(self, cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        encoder_dim = VARIANTS[cfg.variant].encoder.embed_dim
        self.encoder = _build_encoder(cfg, clip, final_norm=True, device=device, dtype=dtype)
        self.decoder = None
        if cfg.decoder.enabled:
            spec = cfg.decoder_spec
            patch_values = 3 * clip.tubelet_size * cfg.patch_size**2
            self.decoder = ReconstructionDecoder(
                encoder_dim,
                spec.embed_dim,
                spec.depth,
                spec.num_heads,
                self.encoder.num_tokens,
                patch_values,
                device=device,
                dtype=dtype,
            )
        self.classifier = BridgingClassifier(
            encoder_dim,
            cfg.num_classes,
            cfg.bridge.embed_dim,
            cfg.bridge.depth,
            cfg.bridge.num_heads,
            cfg.head_dropout,
            device=device,
            dtype=dtype,
        )
        if not _on_meta(self):
            # Module order, as one init_weights(self) would draw: the same weights for a seed.
            init_weights(self.encoder)
            if self.decoder is not None:
                init_weights(self.decoder)
            self.classifier.reset_parameters(cfg.bridge.init, cfg.init_scale)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(cfg.grad_checkpointing)
        set_attention_backend(self, cfg.attention)

    def set_grad_checkpointing(self, n_blocks: int) -> None:
        self.encoder.set_grad_checkpointing(n_blocks)

    def forward(
        self,
        video: torch.Tensor,
        visible_idx: torch.Tensor | None = None,
        masked_idx: torch.Tensor | None = None,
        packed: PackedTokens | None = None,
    ) -> dict[str, torch.Tensor]:
        """video: [B, C, T, H, W] normalised; visible_idx: [B, Nv] (None = all tokens).

        Returns {"logits": [B, K]}; when training with a decoder and a mask, also
        {"pred": [B, Nm, P]}, the reconstruction of the masked tubelets ([Mtot, P] packed).
        """
        if packed is not None:
            x = self.encoder(video, packed=packed)  # [1, Ntot, D]
            out = {"logits": self.classifier(x, packed=packed)}
            if self.training and self.decoder is not None and packed.num_masked > 0:
                out["pred"] = self.decoder.forward_packed(x, packed)
            return out
        x = self.encoder(video, visible_idx)  # [B, Nv, D]
        out = {"logits": self.classifier(x)}
        if self.training and self.decoder is not None and masked_idx is not None and masked_idx.shape[1] > 0:
            out["pred"] = self.decoder(x, visible_idx, masked_idx)
        return out


class ViTClassifier(nn.Module):
    """The standard full-token fine-tuning baseline (VideoMAE): mean pool, fc_norm, Linear."""

    def __init__(self, cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = _build_encoder(cfg, clip, final_norm=False, device=device, dtype=dtype)
        self.head = ClassifierHead(
            VARIANTS[cfg.variant].encoder.embed_dim, cfg.num_classes, cfg.head_dropout, device=device, dtype=dtype
        )
        _init(self, self.head.head, cfg.init_scale)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(cfg.grad_checkpointing)
        set_attention_backend(self, cfg.attention)

    def set_grad_checkpointing(self, n_blocks: int) -> None:
        self.encoder.set_grad_checkpointing(n_blocks)

    def forward(
        self,
        video: torch.Tensor,
        visible_idx: torch.Tensor | None = None,
        masked_idx: torch.Tensor | None = None,
        packed: PackedTokens | None = None,
    ) -> dict[str, torch.Tensor]:
        """video: [B, C, T, H, W]. A visible index (or packed tokens) is accepted (masked
        inference of a full-token model) but the baseline is meant to see every token."""
        return {"logits": self.head(self.encoder(video, visible_idx, packed=packed), packed)}


def build_model(cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None) -> nn.Module:
    """`MARModel` or `ViTClassifier` for `cfg.arch` on clips shaped as `clip`;
    device="meta" builds shapes only."""
    cls = MARModel if cfg.arch == "mar" else ViTClassifier
    return cls(cfg, clip, device=device, dtype=dtype)
