"""ViT backbones from timm, with MoCo v3's fixed 2-D sin-cos position table and frozen
patch projection as options."""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.config import ModelConfig
from mimco.config_rules import PRESETS
from mimco.errors import MimcoError


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's 2-D sin-cos table with a zero CLS slot, (1, 1 + H*W, dim) float: the first half of
    the channels encodes the patch row, the second half the column (sin then cos within each half)."""
    if dim % 4:
        raise MimcoError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid_size), indexing="ij")
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float32) / q)
    out_r, out_c = (grid.flatten()[:, None] * omega[None] for grid in (rows, cols))
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


def resolve_arch(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) from the preset, with explicit non-zero fields winning (the
    config's rules have checked that the heads divide the width)."""
    dim, depth, heads = PRESETS[cfg.arch]
    return cfg.embed_dim or dim, cfg.depth or depth, cfg.num_heads or heads


def create_vit(cfg: ModelConfig, img_size: int, in_chans: int = 3) -> VisionTransformer:
    """A timm VisionTransformer without classifier (``num_classes=0``, CLS pooling)."""
    dim, depth, heads = resolve_arch(cfg)
    model = VisionTransformer(
        img_size=img_size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0, global_pool="token",
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate, weight_init="moco" if cfg.init == "mocov3" else "",
    )
    if cfg.init == "mocov3":  # MoCo v3's patch projection: xavier-uniform over the unrolled (C x p x p) -> D map,
        with torch.no_grad():  # zero bias (timm's weight_init="moco" does the Linear layers, q/k/v apart, and CLS)
            nn.init.xavier_uniform_(model.patch_embed.proj.weight.view(dim, -1))
            nn.init.zeros_(model.patch_embed.proj.bias)
    if cfg.pos_embed == "sincos":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed(model.patch_embed.grid_size, dim))
        model.pos_embed.requires_grad_(False)
    if cfg.freeze_patch_embed:
        model.patch_embed.proj.requires_grad_(False)
    return model


def encode(model: VisionTransformer, x: torch.Tensor, mask: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """All output tokens of a timm ViT after the final norm, optionally SimMIM-masked: images x
    (B, C, H, W) -> (B, P + N, D) tokens, P = ``model.num_prefix_tokens`` (the CLS token first).
    ``mask``: bool (B, N) over the patch grid; masked patch embeddings are replaced by ``mask_token``
    (1, 1, D) before position embeddings are added."""
    t = model.patch_embed(x)
    if mask is not None:
        w = mask.unsqueeze(-1).to(t.dtype)
        t = t * (1.0 - w) + mask_token.to(t.dtype) * w
    # timm's own prefix tokens + position table (timm 1.x: docs/architecture.md#contracts)
    t = model._pos_embed(t)
    t = model.norm_pre(model.patch_drop(t))
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        t = checkpoint_seq(model.blocks, t)  # timm's switch: model.set_grad_checkpointing(True)
    else:
        t = model.blocks(t)
    return model.norm(t)
