"""ViT backbones (timm), the masked student wrapper and projection heads."""

from mimco.models.heads import MoCoMLP, ReconstructionHead
from mimco.models.student import MaskedViT
from mimco.models.vit import PRESETS, create_vit, encode, sincos_pos_embed

__all__ = ["PRESETS", "MaskedViT", "MoCoMLP", "ReconstructionHead", "create_vit", "encode", "sincos_pos_embed"]
