"""The MimCo student: a timm ViT that sees a SimMIM-masked image."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.models.vit import encode


class MaskedViT(nn.Module):
    """Wraps a timm ViT with a learnable mask token (SimMIM: every token goes through the encoder);
    ``self.backbone`` stays an unmodified timm model (its state dict loads into ``timm.create_model``)."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                position: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), mask bool (B, N) -> tokens (B, P + N, D) after the final norm; with
        ``position`` also the position table's rows of the patch grid (1, N, D), read here, inside
        the module's forward, where FSDP has the parameters whole (a copy: FSDP frees them after it)."""
        tokens = encode(self.backbone, x, mask, self.mask_token)
        if not position:
            return tokens
        return tokens, self.backbone.pos_embed[:, -self.backbone.patch_embed.num_patches :].clone()

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
