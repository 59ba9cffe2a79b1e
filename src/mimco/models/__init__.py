"""ViT backbones (timm), the masked student wrapper and projection heads."""

from mimco.models.heads import mlp_head, moco_mlp
from mimco.models.student import MaskedViT
from mimco.models.vit import PRESETS, create_vit, encode, sincos_pos_embed

__all__ = ["PRESETS", "MaskedViT", "create_vit", "encode", "mlp_head", "moco_mlp", "sincos_pos_embed"]
