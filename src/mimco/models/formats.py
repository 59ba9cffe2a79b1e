"""One loader for every backbone checkpoint a user brings: MoCo v3, DINO, MAE, SimMIM, timm,
mimco's own, and the families of :mod:`mimco.models.families` (DINOv2, CLIP, EVA-02, timm models
by name or from a hub folder). The format is detected from the file's contents, never its name;
the architecture is read from the tensor shapes (the heads count, which shapes cannot tell, comes
from the format's known value or the config). Pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from mimco.config import PretrainConfig, TeacherStageConfig, from_dict
from mimco.errors import MimcoError
from mimco.io import read_file, weights_metadata
from mimco.models import families
from mimco.models.heads import MoCoMLP
from mimco.models.vit import resolve_arch
from mimco.runs import backbones, is_checkpoint, pick_encoder

FORMATS = {
    "mocov3": "MoCo v3 pre-training checkpoint",
    "dino": "DINO full checkpoint",
    "mae": "MAE checkpoint",
    "simmim": "SimMIM checkpoint",
    "timm": "timm / DINO backbone state dict",
    "mimco_teacher": "mimco teacher (stage 1) checkpoint",
    "mimco_pretrain": "mimco pretrain (stage 2) checkpoint",
    **families.FAMILIES,
}


@dataclass
class BackboneState:
    """What a checkpoint holds for a ViT backbone, in timm names."""

    kind: str  # a key of FORMATS
    source: str  # which part was taken, e.g. "module.momentum_encoder."
    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # MoCo head.{0..7}.*
    ignored: dict[str, int] = field(default_factory=dict)  # key group -> number of keys not loaded
    num_heads: int = 0  # known from the format or the run config, 0 = unknown
    config: Any = None  # a mimco run config, for mimco's own checkpoints
    stats: tuple[list[float], list[float]] | None = None  # (mean, std) the teacher was trained with, when known
    progress: tuple[int, int] | None = None  # a mimco run's (step, total_steps)

    @property
    def format(self) -> str:
        return FORMATS[self.kind]


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _groups(keys: list[str]) -> dict[str, int]:
    """Count keys by their top-level module (``module.`` and ``encoder.`` prefixes kept): {"predictor.*": 10}."""
    out: dict[str, int] = {}
    for parts in (k.split(".") for k in keys):
        depth = 2 if parts[0] == "module" and len(parts) > 2 else 1
        group = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        out[group] = out.get(group, 0) + 1
    return out


def _split_head(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(backbone without head, MoCo projector keys, other head keys)."""
    body = {k: v for k, v in sd.items() if not k.startswith("head.") and not k.startswith("head_")}
    head = _strip(sd, "head.")
    if {"0.weight", "6.weight"} <= head.keys():
        return body, head, []
    return body, {}, ["head." + k for k in head]


def parse_checkpoint(obj: Any, encoder: str = "momentum") -> BackboneState:
    """Detect the layout of ``obj`` (a loaded checkpoint) and pull out its backbone."""
    if not isinstance(obj, dict):
        raise MimcoError(f"a checkpoint should hold a dict, this one holds {type(obj).__name__}")
    if is_checkpoint(obj):  # mimco's own run checkpoint (layout: mimco.runs)
        stage, sd = obj["stage"], obj["model"]
        if stage not in ("teacher", "pretrain"):
            raise MimcoError(f"this is a mimco '{stage}' checkpoint (a fine-tuned model); its scores are in its run "
                             "folder's summary.json; pass a teacher or pretrain checkpoint")
        kind = f"mimco_{stage}"
        cfg = from_dict(TeacherStageConfig if stage == "teacher" else PretrainConfig, obj["config"])
        prefix = pick_encoder(encoder, backbones(obj), FORMATS[kind])
        body, proj, _ = _split_head(_strip(sd, prefix))
        rest = [k for k in sd if not k.startswith(prefix)]
        return BackboneState(kind, prefix, body, proj, _groups(rest), resolve_arch(cfg.model)[2], cfg,
                             progress=(int(obj.get("step", 0)), int(obj.get("total_steps", 0))))
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if any(k.startswith("module.base_encoder.") for k in sd):
            prefix = pick_encoder(encoder, {"momentum": "module.momentum_encoder.", "base": "module.base_encoder."},
                             FORMATS["mocov3"])
            body, proj, _ = _split_head(_strip(sd, prefix))
            if "patch_embed.proj.weight" not in body:
                raise MimcoError("this MoCo v3 checkpoint has a convolutional stem (vit_conv_*); only the plain "
                                 "patch-projection ViTs (vit-s-300ep, vit-b-300ep) are supported")
            return BackboneState("mocov3", prefix, body, proj, _groups([k for k in sd if not k.startswith(prefix)]), 12)
        if "module.head.weight" in sd and sd["module.head.weight"].ndim == 2:
            raise MimcoError("this is a MoCo v3 linear-probe checkpoint (linear-vit-*.pth.tar: a frozen backbone plus "
                             "a 1000-class linear head), not a pre-training one; pass vit-s-300ep.pth.tar / "
                             "vit-b-300ep.pth.tar")
        obj = sd  # a plain state dict saved under 'state_dict'
    if (found := families.detect(obj)) is not None:
        kind, sd = found
        rest = [k for k in sd if kind == "clip" and "visual." not in k]  # CLIP's text tower
        return BackboneState(kind, "visual." if kind == "clip" else "", sd, {}, _groups(rest), 0)
    if "student" in obj and "teacher" in obj:  # DINO full checkpoint
        part = pick_encoder(encoder, {"momentum": "teacher", "base": "student"}, FORMATS["dino"])
        sd = obj[part]
        prefix = "module.backbone." if any(k.startswith("module.backbone.") for k in sd) else "backbone."
        rest = [k for k in sd if not k.startswith(prefix)] + [k for k in obj if k != part]
        return BackboneState("dino", f"{part}.{prefix}", _strip(sd, prefix), {}, _groups(rest), 0)
    if "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
        if any(k.startswith("encoder.") for k in sd):
            body, _, heads = _split_head(_strip(sd, "encoder."))
            body = {k: v for k, v in body.items() if k != "mask_token"}
            token = ["encoder.mask_token"] * ("encoder.mask_token" in sd)
            rest = [k for k in sd if not k.startswith("encoder.")] + token + heads
            return BackboneState("simmim", "model.encoder.", body, {}, _groups(rest), 0)
        keep = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
        body, _, heads = _split_head(keep)
        rest = [k for k in sd if k.startswith("decoder") or k == "mask_token"] + heads
        return BackboneState("mae", "model.", body, {}, _groups(rest), 0)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    body, proj, heads = _split_head(sd)
    return BackboneState("timm", "", body, proj, _groups(heads), 0)


def infer_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ViT hyper-parameters read from tensor shapes (timm names)."""
    try:
        w = sd["patch_embed.proj.weight"]  # (D, C, P, P)
        pos = sd["pos_embed"]
    except KeyError as e:
        raise MimcoError(f"no ViT backbone found: key {e} is missing; the keys fit no known layout, "
                         f"{families.closest_layout(set(sd))}") from None
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    depth = families._depth(sd, r"blocks\.(\d+)\.")
    regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    prefix = 1 if "cls_token" in sd and not regs else 0  # timm's register models keep no prefix slots in the table
    grid = int(round((pos.shape[1] - prefix) ** 0.5))
    if grid * grid != pos.shape[1] - prefix:
        raise MimcoError(f"pos_embed of {pos.shape[1]} tokens is not a square grid plus {prefix} CLS token")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    return {"embed_dim": dim, "depth": depth, "patch_size": patch, "in_chans": in_chans, "img_size": grid * patch,
            "mlp_ratio": fc1.shape[0] / dim if fc1 is not None else 4.0, "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
            "class_token": "cls_token" in sd, "reg_tokens": regs, "no_embed_class": regs > 0,
            "init_values": 1.0 if "blocks.0.ls1.gamma" in sd else None, "pre_norm": "norm_pre.weight" in sd}


def build_backbone(state: BackboneState, img_size: int = 0, num_heads: int = 0, path: str = "") -> VisionTransformer:
    """A timm ViT holding ``state``'s backbone weights, at ``img_size`` (0 = the checkpoint's; the
    position table is resampled bicubically, CLS slot kept)."""
    if state.kind in families.FAMILIES:  # not in timm ViT names: through timm's converters
        return _build_family(state, img_size, num_heads, path)
    arch = infer_arch(state.backbone)
    dim = arch["embed_dim"]
    known = state.num_heads  # the run config's or the format's (MoCo v3 and mimco files record theirs)
    if num_heads and known and num_heads != known:
        raise MimcoError(f"{state.format} {path} was trained with {known} heads but the config asks for {num_heads}; "
                         f"set teacher.num_heads={known} (or 0 to take it from the checkpoint)")
    heads = families._heads(dim, num_heads or known, "checkpoint's")
    size = img_size or arch["img_size"]
    if size % arch["patch_size"]:
        raise MimcoError(f"image size {size} is not divisible by the checkpoint's patch size {arch['patch_size']}")
    vit = VisionTransformer(**{**arch, "img_size": size}, num_heads=heads, num_classes=0, global_pool="token")
    sd = dict(state.backbone)
    if "pos_embed" in sd and sd["pos_embed"].shape != vit.pos_embed.shape:
        old = arch["img_size"] // arch["patch_size"]
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(vit.patch_embed.grid_size), [old, old],
                                                 num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MimcoError(f"{path} looks like a {state.format} but its keys do not fit a timm ViT: "
                         f"missing {sorted(missing)[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {sorted(unexpected)[:4]}{' ...' if len(unexpected) > 4 else ''}")
    return vit


def _build_family(state: BackboneState, img_size: int, num_heads: int, path: str) -> torch.nn.Module:
    """A DINOv2, CLIP or EVA-02 file as the timm model of its shapes, loaded through timm's converter."""
    sd = state.backbone
    build = {"dinov2": families.build_dinov2, "clip": families.build_clip}.get(state.kind)
    try:
        model = build(sd, num_heads, img_size) if build else families.build_eva02(sd, img_size)
    except KeyError as e:
        raise MimcoError(f"{path} looks like a {state.format} but key {e} is missing; "
                         f"{families.closest_layout(set(sd))}") from None
    families.load_weights(model, sd, f"a {state.format} ({path})", keep_head=state.kind == "clip")
    return model


def load_backbone(path: str, encoder: str = "momentum", img_size: int = 0, num_heads: int = 0,
                  model_name: str = "") -> tuple[torch.nn.Module, BackboneState]:
    """Read, detect and build: the one entry point for any backbone checkpoint, or for a hub folder
    of a timm model; ``model_name`` builds that timm model and loads the file into it.

    Returns (timm ViT-family model with ``head`` = the file's projector when it has one, else
    Identity; the parsed state).
    """
    hf = None
    if Path(path).is_dir():
        name, hf, sd = families.read_hf_folder(Path(path))
        model_name = model_name or name
        state = BackboneState("hf_timm", "", sd)
    else:
        state = parse_checkpoint(read_file(path), encoder)
        recorded = json.loads(weights_metadata(path).get("model_args", "{}"))  # a mimco backbone.safetensors
        if state.kind == "timm" and recorded.get("num_heads"):
            state.num_heads = int(recorded["num_heads"])  # the heads count is in no tensor's shape
    if not model_name:
        model = build_backbone(state, img_size, num_heads, str(path))
        state.stats = families.default_stats(state.kind, model)
    else:
        kwargs = dict(hf["model_args"]) if hf else {}
        if num_heads or state.num_heads:
            kwargs["num_heads"] = num_heads or state.num_heads
        saved_size = kwargs.pop("img_size", 0)
        model = families.create_named(model_name, img_size or saved_size, **kwargs)
        state.ignored.update(families.load_weights(model, state.backbone, f"teacher.model={model_name}",
                                                   keep_head=state.kind == "clip" or "clip" in model_name))
        # a MoCo / DINO / MAE / mimco file: trained on the data's statistics
        own = state.kind not in families.FAMILIES and state.kind != "timm"
        state.stats = None if own else families.default_stats("hf_timm" if hf else "timm_named", model, hf)
    if state.projector:
        model.head = MoCoMLP.from_state_dict(state.projector)
    return model, state
