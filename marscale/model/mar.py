"""MAR and the full-token baseline, assembled from the encoder, decoder and heads.

Shapes: B batch, C/T/H/W the clip, N tokens per clip, K classes. Which tokens each clip
shows is one `marscale.tokens.packing.PackedTokens` (None: every token): the encoder and
the classifier run on the packed visible tokens [Ntot, D], the decoder on rectangular
[B, N] rows again; predictions of masked tokens come back packed [Mtot, P]. A batch whose
clips keep equal numbers of tokens is the same layout, run by attention's rectangular
fast path.

The models return predictions only; the losses and the reconstruction target are built
where the loss is computed (`marscale.engine.loss`), from the clip the model saw.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from marscale.core.clip import ClipConfig, token_grid, tubelet_values
from marscale.model.config import VARIANTS, ModelConfig
from marscale.model.decoder import ReconstructionDecoder
from marscale.model.encoder import VideoViTEncoder
from marscale.model.heads import BridgingClassifier, ClassifierHead
from marscale.model.layers import init_weights, scale_head, set_attention
from marscale.tokens.packing import PackedTokens


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())  # shapes only: nothing to initialise


class VideoModel(nn.Module):
    """What MAR and the baseline share: the encoder on a clip's visible tokens, activation
    checkpointing, the attention kernel, and the forward over one token layout. Subclasses
    add their heads (`_heads`)."""

    def __init__(self, cfg: ModelConfig, clip: ClipConfig, final_norm: bool, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        spec = VARIANTS[cfg.variant].encoder
        self.encoder = VideoViTEncoder(
            spec.embed_dim,
            spec.depth,
            spec.num_heads,
            token_grid(clip, spec.patch_size),
            spec.mlp_ratio,
            spec.patch_size,
            clip.tubelet_size,
            cfg.drop_path,
            final_norm=final_norm,
            device=device,
            dtype=dtype,
        )

    def _finish(self, compute_device) -> None:
        """After the subclass built its heads: checkpointing and the attention kernel (for
        `compute_device`; None: the CPU)."""
        if self.cfg.grad_checkpointing:
            self.set_grad_checkpointing(self.cfg.grad_checkpointing)
        self.set_attention(self.cfg.attention, compute_device or "cpu")

    def set_grad_checkpointing(self, n_blocks: int) -> None:
        self.encoder.set_grad_checkpointing(n_blocks)

    def set_attention(self, name: str, device) -> None:
        """Choose the packed-attention kernel `name` for running on `device` (once; see
        `marscale.model.attention`)."""
        set_attention(self, name, device)

    def forward(self, video: torch.Tensor, tokens: PackedTokens | None = None) -> dict[str, torch.Tensor]:
        """video: [B, C, T, H, W] normalised; tokens: which tokens each clip shows (None: all).

        Returns {"logits": [B, K]}; MAR training with a decoder and masked tokens also
        returns {"pred": [Mtot, P]}, the reconstruction of the masked tubelets.
        """
        if tokens is None:
            tokens = PackedTokens.full(video.shape[0], self.encoder.num_tokens, video.device)
        return self._heads(self.encoder(video, tokens), tokens)

    def _heads(self, x: torch.Tensor, tokens: PackedTokens) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MARModel(VideoModel):
    """Encoder on visible tokens + reconstruction decoder + bridging classifier."""

    def __init__(self, cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None, compute_device=None):
        super().__init__(cfg, clip, final_norm=True, device=device, dtype=dtype)
        encoder_dim = self.encoder.embed_dim
        self.decoder = None
        if cfg.decoder.enabled:
            spec = cfg.decoder_spec
            self.decoder = ReconstructionDecoder(
                encoder_dim,
                spec.embed_dim,
                spec.depth,
                spec.num_heads,
                self.encoder.num_tokens,
                tubelet_values(clip, cfg.patch_size),
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
        self._finish(compute_device)

    def _heads(self, x: torch.Tensor, tokens: PackedTokens) -> dict[str, torch.Tensor]:
        out = {"logits": self.classifier(x, tokens)}
        if self.training and self.decoder is not None and tokens.num_masked > 0:
            out["pred"] = self.decoder(x, tokens)
        return out


class ViTClassifier(VideoModel):
    """The standard full-token fine-tuning baseline (VideoMAE): mean pool, fc_norm, Linear.
    It accepts masked tokens too (masked inference of a full-token model), but is meant to
    see every token."""

    def __init__(self, cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None, compute_device=None):
        super().__init__(cfg, clip, final_norm=False, device=device, dtype=dtype)
        self.head = ClassifierHead(self.encoder.embed_dim, cfg.num_classes, cfg.head_dropout, device=device, dtype=dtype)
        if not _on_meta(self):
            init_weights(self)
            scale_head(self.head.head, cfg.init_scale)
        self._finish(compute_device)

    def _heads(self, x: torch.Tensor, tokens: PackedTokens) -> dict[str, torch.Tensor]:
        return {"logits": self.head(x, tokens)}


def build_model(cfg: ModelConfig, clip: ClipConfig, device=None, dtype=None, compute_device=None) -> VideoModel:
    """`MARModel` or `ViTClassifier` for `cfg.arch` on clips shaped as `clip`;
    device="meta" builds shapes only. compute_device: where the model will run (the
    attention kernel is chosen for it; default `device`, or the CPU)."""
    if compute_device is None and device is not None and torch.device(device).type != "meta":
        compute_device = device
    cls = MARModel if cfg.arch == "mar" else ViTClassifier
    return cls(cfg, clip, device=device, dtype=dtype, compute_device=compute_device)
