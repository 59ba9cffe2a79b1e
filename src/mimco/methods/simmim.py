"""SimMIM (Xie et al. 2022): the MIM-only baseline. Mask token, a linear pixel decoder, L1 on
the masked pixels. Shares the student and masks with MimCo, so the two compare like for like."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.distributed import rank
from mimco.masking import MaskGenerator
from mimco.methods.base import MethodDefaults
from mimco.methods.registry import register_method
from mimco.models import create_vit
from mimco.models.student import MaskedViT


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, col, channel) within a patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class MaskedMethod(MethodDefaults):
    """The hooks of a method that trains a masked student (SimMIM, MimCo)."""

    student: MaskedViT

    def backbone(self) -> VisionTransformer:
        return self.student.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}

    def fsdp_units(self) -> list[nn.Module]:
        return [self.student]  # its forward calls the backbone's parts, not the backbone's forward


class SimMIM(MaskedMethod, nn.Module):
    """Masked student, linear pixel decoder; the loss is L1 on the masked patches' pixels."""

    def __init__(self, student: MaskedViT, mask_generator: MaskGenerator) -> None:
        super().__init__()
        self.student, self.mask_generator = student, mask_generator
        pe = student.backbone.patch_embed
        self.patch_size = pe.patch_size[0]
        self.decoder = nn.Linear(student.backbone.embed_dim, self.patch_size**2 * pe.proj.in_channels)

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [x] (B, C, H, W) -> (mean L1 over masked pixels, logs)."""
        (x,) = views
        mask = self.mask_generator(x.shape[0], step, rank() * x.shape[0] if first_index is None else first_index,
                                   x.device)
        tokens = self.student(x, mask)[:, self.student.num_prefix_tokens :]
        err = (self.decoder(tokens) - patchify(x, self.patch_size)).abs().mean(-1)  # (B, N)
        w = mask.to(err.dtype)
        return (err * w).sum() / w.sum(), {}


def masked_student(cfg: Any) -> tuple[MaskedViT, MaskGenerator]:
    """The stage-2 student of a :class:`~mimco.config.PretrainConfig` and its mask generator."""
    student = MaskedViT(create_vit(cfg.model, cfg.data.img_size, cfg.data.channels))
    grid = student.backbone.patch_embed.grid_size
    return student, MaskGenerator.from_config(cfg.mask, cfg.model.patch_size, grid, cfg.train.seed)


@register_method("simmim", stage="pretrain", views="one")
def build_simmim(cfg: Any, device: torch.device, **_: Any) -> SimMIM:
    """The SimMIM baseline of a :class:`~mimco.config.PretrainConfig` (no teacher)."""
    return SimMIM(*masked_student(cfg)).to(device)
