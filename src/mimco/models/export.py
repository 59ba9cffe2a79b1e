"""Export a backbone as a timm state dict (safetensors) plus the ``timm.create_model`` arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.io import save_weights

_NAMES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224", 1024: "vit_large_patch16_224"}


def timm_kwargs(vit: VisionTransformer) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model`` build exactly ``vit`` (without head)."""
    blk = vit.blocks[0]
    return {"img_size": vit.patch_embed.img_size[0], "patch_size": vit.patch_embed.patch_size[0],
            "in_chans": vit.patch_embed.proj.in_channels, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
            "num_heads": blk.attn.num_heads, "mlp_ratio": blk.mlp.fc1.out_features / vit.embed_dim,
            "qkv_bias": blk.attn.qkv.bias is not None, "class_token": vit.cls_token is not None,
            "num_classes": 0, "global_pool": vit.global_pool,
            **({"reg_tokens": vit.num_reg_tokens, "no_embed_class": vit.no_embed_class} if vit.num_reg_tokens else {}),
            **({"init_values": 1.0} if not isinstance(blk.ls1, nn.Identity) else {}),  # LayerScale (its values load)
            **({"pre_norm": True} if not isinstance(vit.norm_pre, nn.Identity) else {})}


def export_timm(vit: VisionTransformer, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    save_weights(state, out / "model.safetensors", {"format": "timm"})
    cfg = {"model_name": _NAMES.get(vit.embed_dim, "vit_base_patch16_224"), "model_kwargs": timm_kwargs(vit),
           "weights": "model.safetensors", **(info or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
