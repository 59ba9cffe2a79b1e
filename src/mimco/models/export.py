"""Export a backbone as a timm state dict (safetensors) plus the ``timm.create_model`` arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.io import save_weights

_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
#: what the image size, channels and pooling aside must equal for a timm name to describe the weights
_ARCH = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "reg_tokens",
         "no_embed_class", "init_values", "pre_norm")


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


def matching_name(vit: VisionTransformer) -> str | None:
    """The timm model name whose architecture is exactly ``vit``'s (``vit_small_patch16_224`` for a
    ViT-S/16), or None when no registered ViT is (a 128-wide, 4-deep patch-7 ViT): built on the
    meta device, so nothing is allocated."""
    kw = timm_kwargs(vit)
    size = _SIZES.get(kw["embed_dim"])
    name = f"vit_{size}_patch{kw['patch_size']}_224"
    if size is None or not timm.is_model(name):
        return None
    with torch.device("meta"):
        ref = timm_kwargs(timm.create_model(name, pretrained=False, num_classes=0))
    return name if all(ref.get(k) == kw.get(k) for k in _ARCH) else None


def export_timm(vit: VisionTransformer, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``model_kwargs``: the exact architecture;
    ``model_name``: the timm model it is, or null when no registered one is) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    save_weights(state, out / "model.safetensors", {"format": "timm"})
    cfg = {"model_name": matching_name(vit), "model_kwargs": timm_kwargs(vit),
           "weights": "model.safetensors", **(info or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
