"""Released layouts of other ViT families: DINOv2 hub files, OpenCLIP / OpenAI CLIP visual towers,
EVA-02, and timm models by name or from a Hugging Face hub folder. Each is recognised from its keys,
its architecture read from tensor shapes (or a timm name), its weights converted by the family's
timm ``checkpoint_filter_fn`` (which also resamples position tables). Nothing is downloaded.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.errors import MimcoError
from mimco.io import read_file

#: kind -> what users call it
FAMILIES = {
    "dinov2": "DINOv2 hub backbone",
    "clip": "OpenCLIP / OpenAI CLIP visual tower",
    "eva02": "EVA-02 checkpoint",
    "hf_timm": "timm model folder (Hugging Face hub layout)",
    "timm_named": "timm model by name",
}

#: EVA-02 width -> the timm model of that width (the released EVA-02 backbones are /14)
EVA02_BY_WIDTH = {192: "eva02_tiny_patch14_224", 384: "eva02_small_patch14_224", 768: "eva02_base_patch14_224",
                  1024: "eva02_large_patch14_224"}

#: keys that identify each layout, for naming the closest one when a file fits none
SIGNATURES: dict[str, tuple[str, ...]] = {
    "timm ViT / DINO backbone": ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                                 "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "norm.weight"),
    FAMILIES["dinov2"]: ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.0.ls1.gamma",
                         "blocks.0.attn.qkv.weight", "norm.weight"),
    FAMILIES["clip"]: ("visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
                       "visual.ln_pre.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                       "visual.ln_post.weight", "visual.proj"),
    FAMILIES["eva02"]: ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.q_proj.weight",
                        "blocks.0.mlp.w1.weight", "blocks.0.mlp.w3.weight", "norm.weight"),
}


def detect(obj: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(kind, the state dict in its released names) for a DINOv2, CLIP or EVA-02 file, else None."""
    # the state dict itself, or the one a training checkpoint wraps
    sd = next((obj[k] for k in ("model_ema", "model", "module", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not all(isinstance(v, torch.Tensor) for v in list(sd.values())[:50]):
        return None
    if "visual.class_embedding" in sd or "module.visual.class_embedding" in sd:
        return "clip", sd
    if "mask_token" in sd and "blocks.0.ls1.gamma" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "dinov2", sd
    if "blocks.0.attn.q_proj.weight" in sd or "blocks.0.mlp.w1.weight" in sd or "blocks.0.mlp.ffn_ln.weight" in sd:
        return "eva02", sd
    return None


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def _vit_patterns() -> set[str]:
    """Every key pattern of a timm ViT (block numbers as N), for naming the keys a file has in excess."""
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=1, num_classes=2,
                            init_values=1.0)
    return {p for k in vit.state_dict() for p in (_pattern(k), _pattern(k).replace(".ls1.", ".").replace(".ls2.", "."))}


def closest_layout(keys: set[str]) -> str:
    """'closest known layout: NAME (k of n identifying keys); missing [...]; unexpected [...]' for a
    file that fits none."""
    name, sig = max(SIGNATURES.items(), key=lambda kv: sum(k in keys for k in kv[1]))
    missing = [k for k in sig if k not in keys]
    known = {_pattern(k) for k in sig} | (_vit_patterns() if name == "timm ViT / DINO backbone" else set())
    unexpected = sorted({_pattern(k) for k in keys} - known)
    return (f"closest known layout: {name} ({len(sig) - len(missing)} of {len(sig)} identifying keys); missing "
            f"{missing[:4]}; unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")


def _depth(sd: dict[str, torch.Tensor], pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def _heads(dim: int, num_heads: int, whose: str = "teacher's") -> int:
    heads = num_heads or max(dim // 64, 1)  # timm's head width of 64
    if dim % heads:
        raise MimcoError(f"{heads} heads do not divide the {whose} width {dim}; set teacher.num_heads to a divisor "
                         f"of {dim}")
    return heads


def _grid_size(tokens: int, what: str) -> int:
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise MimcoError(f"the {what} position table has {tokens} patch positions, not a square grid")
    return grid


def build_dinov2(sd: dict[str, torch.Tensor], num_heads: int, img_size: int = 0) -> nn.Module:
    """An empty timm ViT shaped like the DINOv2 hub file ``sd`` (LayerScale, registers, SwiGLU for
    the giant), at ``img_size`` (0 = the file's: 518 for the released ones)."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    grid = _grid_size(sd["pos_embed"].shape[1] - 1, "DINOv2")  # the hub table always holds the CLS slot
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    extra: dict[str, Any] = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if swiglu else {}
    return VisionTransformer(img_size=img_size or grid * patch, patch_size=patch, in_chans=w.shape[1], embed_dim=dim,
                             depth=_depth(sd, r"blocks\.(\d+)\."), num_heads=_heads(dim, num_heads),
                             mlp_ratio=hidden / dim, init_values=1.0, reg_tokens=regs, no_embed_class=regs > 0,
                             num_classes=0, global_pool="token", **extra)


def build_clip(sd: dict[str, torch.Tensor], num_heads: int, img_size: int = 0) -> nn.Module:
    """An empty timm ViT shaped like the CLIP visual tower in ``sd`` (pre-norm, LayerNorm eps 1e-5,
    the image projection as ``head``), at ``img_size`` (0 = the file's). OpenCLIP's GELU is assumed;
    OpenAI's own weights use QuickGELU: name the timm model (``vit_*_clip_quickgelu_*``) for those."""
    p = "module.visual." if "module.visual.class_embedding" in sd else "visual."
    w = sd[p + "conv1.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    grid = _grid_size(sd[p + "positional_embedding"].shape[0] - 1, "CLIP")
    hidden = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    proj = sd.get(p + "proj")
    return VisionTransformer(img_size=img_size or grid * patch, patch_size=patch, in_chans=w.shape[1], embed_dim=dim,
                             depth=_depth(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\."),
                             num_heads=_heads(dim, num_heads), mlp_ratio=hidden / dim, pre_norm=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5), global_pool="token",
                             num_classes=proj.shape[1] if proj is not None else 0)


def build_eva02(sd: dict[str, torch.Tensor], img_size: int) -> nn.Module:
    """The timm EVA-02 model of the file's width and depth, at ``img_size`` (0 = the file's)."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    if dim not in EVA02_BY_WIDTH or patch != 14:
        raise MimcoError(f"an EVA-02 file of width {dim} and patch {patch} matches none of timm's EVA-02 models "
                         f"(widths {sorted(EVA02_BY_WIDTH)}, patch 14); name one with teacher.model=")
    grid = _grid_size(sd["pos_embed"].shape[1] - 1, "EVA-02")
    return timm.create_model(EVA02_BY_WIDTH[dim], pretrained=False, num_classes=0, img_size=img_size or grid * patch,
                             depth=_depth(sd, r"blocks\.(\d+)\."))


def create_named(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)`` without weights (no download), at ``img_size`` (0 = its default),
    refusing names timm does not know and models without a patch-token grid."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with timm.list_models('vit_*')"
        raise MimcoError(f"teacher.model={name} is not a timm model name{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}),
                                  **kwargs)
    except TypeError as e:
        raise MimcoError(f"teacher.model={name} cannot be built at teacher.img_size={img_size}: {e}") from None
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "forward_intermediates")):
        raise MimcoError(f"teacher.model={name} is not a ViT-family model (no patch tokens to reconstruct); "
                         "choose a vit_*, deit_*, eva02_* or *_dinov2 / *_clip_* model")
    return model


def read_hf_folder(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(timm model name, its pretrained config, weights) of a Hugging Face hub folder of a timm model
    (``config.json`` with ``architecture``, ``model.safetensors`` or ``pytorch_model.bin``)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
        arch = cfg["architecture"]
    except (OSError, ValueError, KeyError):
        raise MimcoError(f"{path} is a folder but not a timm model folder: it needs config.json naming the "
                         "'architecture' and model.safetensors (as on the Hugging Face hub)") from None
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
    if weights is None:
        raise MimcoError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")
    return arch, {**cfg.get("pretrained_cfg", {}), "model_args": cfg.get("model_args", {})}, read_file(weights)


def load_weights(model: nn.Module, raw: dict[str, torch.Tensor], what: str, keep_head: bool = False) -> dict[str, int]:
    """Convert ``raw`` with the model family's timm converter and load it; with ``keep_head`` the
    file's ``head`` (CLIP's image projection) is kept, otherwise a classifier is left out. Returns
    the groups of keys left out. One-line error, with the missing and unexpected keys, when the file
    does not fit ``model``."""
    kernel = next((v.shape[-1] for k, v in raw.items() if k.endswith(("patch_embed.proj.weight", "conv1.weight"))
                   and isinstance(v, torch.Tensor) and v.ndim == 4), None)
    if kernel is not None and kernel != model.patch_embed.proj.kernel_size[-1]:
        raise MimcoError(f"the file has patch size {kernel} but {what} has {model.patch_embed.proj.kernel_size[-1]}; "
                         f"name a /{kernel} model")
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    sd = convert(dict(raw), model) if convert is not None else dict(raw)
    head = sd.get("head.weight")
    if keep_head and head is not None and head.ndim == 2 and isinstance(getattr(model, "head", None), nn.Identity):
        model.reset_classifier(head.shape[0])  # keep the projection: teacher.image_target=projector
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))  # e.g. DeiT's head, head_dist
    own = model.state_dict()
    dropped = [k for k in sd if k.startswith(heads) and k not in own]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    clash = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if clash:
        raise MimcoError(f"the weights do not fit {what}: shapes differ (file vs model) for {clash[:3]}"
                         f"{' ...' if len(clash) > 3 else ''}; name a model of the file's width and depth")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MimcoError(f"the weights do not fit {what}: missing "
                         f"{sorted(missing)[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {sorted(unexpected)[:4]}{' ...' if len(unexpected) > 4 else ''}; check that "
                         "teacher.model names the file's architecture")
    groups = ", ".join(sorted({k.split(".")[0] for k in dropped}))
    return {f"classifier ({groups})": len(dropped)} if dropped else {}


def describe(model: nn.Module) -> dict[str, Any]:
    """Width, depth, heads, patch, image size, input channels and prefix tokens of a built ViT."""
    attn = model.blocks[0].attn
    return {"embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": getattr(attn, "num_heads", 0),
            "patch_size": model.patch_embed.proj.kernel_size[-1], "img_size": model.patch_embed.img_size[0],
            "in_chans": model.patch_embed.proj.in_channels, "prefix_tokens": model.num_prefix_tokens,
            "reg_tokens": getattr(model, "num_reg_tokens", 0)}


def default_stats(kind: str, model: nn.Module,
                  hf_cfg: dict[str, Any] | None = None) -> tuple[list[float], list[float]] | None:
    """The normalisation a family was trained with, when known (CLIP's, or a timm model's
    pretrained config); None = the data's."""
    known = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)}
    if kind in known:
        return list(known[kind][0]), list(known[kind][1])
    if hf_cfg is None and kind not in ("timm_named", "eva02"):
        return None
    cfg = hf_cfg if hf_cfg is not None else getattr(model, "pretrained_cfg", None) or {}
    return (list(cfg["mean"]), list(cfg["std"])) if cfg.get("mean") and cfg.get("std") else None
