"""Export a backbone as a timm hub folder: ``model.safetensors``, ``config.json`` (architecture,
exact ``model_args``, ``pretrained_cfg`` with the training data's mean and std) and a model card,
which ``timm.create_model("local-dir:PATH", pretrained=True)`` builds by itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.errors import MimcoError
from mimco.io import save_weights
from mimco.models.card import model_card
from mimco.models.families import FAMILIES
from mimco.models.formats import load_backbone
from mimco.runs import CONFIG

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


def export_timm(vit: VisionTransformer, out_dir: str | Path, mean: list[float], std: list[float],
                info: dict[str, Any] | None = None, card: str = "") -> Path:
    """A timm hub folder in ``out_dir``: ``model.safetensors`` (the backbone without head), ``config.json``
    (what ``timm.create_model("local-dir:PATH")`` and ``hf-hub:`` read: the architecture, its exact
    ``model_args``, and a ``pretrained_cfg`` with the statistics it was trained on and mimco's evaluation
    transform; ``info`` goes under ``mimco``) and, given ``card``, ``README.md`` (the model card)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    save_weights(state, out / "model.safetensors", {"format": "pt"})
    kw = timm_kwargs(vit)
    c, s = kw["in_chans"], kw["img_size"]
    pretrained = {"tag": "mimco", "input_size": [c, s, s], "fixed_input_size": True, "interpolation": "bilinear",
                  "crop_pct": 0.875 if s >= 64 else 1.0, "crop_mode": "center", "mean": list(mean[:c]),
                  "std": list(std[:c]), "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
                  "license": "apache-2.0"}
    # the timm name that is exactly the ViT or, when none is, one whose model_args (below) rebuild the ViT
    config = {"architecture": matching_name(vit) or "vit_base_patch16_224", "num_classes": 0,
              "num_features": vit.embed_dim, "global_pool": kw["global_pool"],
              "model_args": {k: v for k, v in kw.items() if k != "num_classes"}, "pretrained_cfg": pretrained,
              **({"mimco": info} if info else {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if card:
        (out / "README.md").write_text(card)
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, encoder: str = "momentum") -> tuple[Path, str]:
    """``mimco export``: the backbone of ``checkpoint`` (a run's last.pt or snapshot, or a plain ViT
    file) as a hub folder with its model card. Returns (the folder, where mean/std came from): a
    run's data statistics, the file's own, or ImageNet's when the file records none."""
    model, state = load_backbone(str(checkpoint), encoder)
    if state.kind in FAMILIES:
        raise MimcoError(f"{checkpoint} is a {state.format}: timm reads it as it is, e.g. timm.create_model(NAME, "
                         f"pretrained=True, pretrained_cfg_overlay=dict(file='{checkpoint}')); mimco export "
                         "converts mimco runs and plain ViT files")
    if state.config is not None:  # a mimco run: the statistics of its training data
        mean, std, said = state.config.data.mean, state.config.data.std, "the run's data.mean / data.std"
    elif state.stats is not None:
        (mean, std), said = state.stats, "the file's own"
    else:
        mean, std, said = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD), "ImageNet's (the file records none)"
    parent = Path(checkpoint).parent
    run_dir = parent if state.config is not None and (parent / CONFIG).is_file() else None
    card = model_card(model, Path(out_dir).name, str(checkpoint), state.format, state.config, run_dir, state.progress)
    info = {"source": str(checkpoint), "source_format": state.format, "source_part": state.source}
    return export_timm(model, out_dir, mean, std, info, card), said
