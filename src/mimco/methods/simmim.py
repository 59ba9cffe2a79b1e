"""SimMIM (Xie et al. 2022): the MIM-only baseline. Mask token, a linear pixel decoder, L1 on
the masked pixels. Shares the student and masks with MimCo, so the two compare like for like."""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from mimco.distributed import rank
from mimco.masking import MaskGenerator
from mimco.methods.base import MethodDefaults
from mimco.models.student import MaskedViT


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, col, channel) within a patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class SimMIM(MethodDefaults, nn.Module):
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
        mask = self.mask_generator(x.shape[0], step, rank() * x.shape[0] if first_index is None else first_index, x.device)
        tokens = self.student(x, mask)[:, self.student.num_prefix_tokens :]
        err = (self.decoder(tokens) - patchify(x, self.patch_size)).abs().mean(-1)  # (B, N)
        w = mask.to(err.dtype)
        return (err * w).sum() / w.sum(), {}

    def backbone(self) -> VisionTransformer:
        return self.student.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}
