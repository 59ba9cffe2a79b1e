"""Stage 1: MoCo v3 for ViT (Chen, Xie, He 2021), the contrastive teacher."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.config import setting
from mimco.methods.base import MethodDefaults
from mimco.methods.losses import GlobalInfoNCE
from mimco.methods.registry import register_method
from mimco.models import create_vit
from mimco.models.heads import MoCoMLP


@dataclass
class MocoConfig:
    """The ``moco:`` section: MoCo v3's projector and predictor widths, InfoNCE temperature and momentum."""

    proj_dim: int = setting(256, min=1, what="the projection width", fixed=True)
    mlp_dim: int = setting(4096, min=1, what="the MLPs' hidden width", fixed=True)
    temperature: float = setting(0.2, above=0, what='the InfoNCE temperature')
    momentum: float = 0.99  # rises to 1 on a per-iteration cosine


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Per-iteration cosine from ``base`` at step 0 to 1 at the last step."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) * (1.0 - base)


class MoCoV3(MethodDefaults, nn.Module):
    """Base encoder + projector + predictor, and an EMA momentum encoder + projector.

    Keys follow the released checkpoints without the DDP prefix: ``base_encoder.*`` (its
    ``head`` is the 3-layer projector), ``momentum_encoder.*``, ``predictor.*``.
    """

    def __init__(self, backbone: VisionTransformer, proj_dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.2, base_momentum: float = 0.99) -> None:
        super().__init__()
        backbone.head = MoCoMLP(3, backbone.embed_dim, mlp_dim, proj_dim)
        self.base_encoder = backbone
        self.momentum_encoder = copy.deepcopy(backbone).requires_grad_(False)
        self.predictor = MoCoMLP(2, proj_dim, mlp_dim, proj_dim)
        self.criterion = GlobalInfoNCE(temperature)
        self.base_momentum = base_momentum

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """momentum_param = m * momentum_param + (1 - m) * base_param."""
        mom = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, [p.detach() for p in self.base_encoder.parameters()], alpha=1.0 - m)

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """views: [x1, x2], each (B, C, H, W) -> (loss, logs). ``first_index`` (the micro-batch's
        place in the global batch) is unused: MoCo draws no masks."""
        q1, q2 = (self.predictor(self.base_encoder(x)) for x in views)
        with torch.no_grad():  # the momentum encoder as after_step(step) left it: read here, never written
            k1, k2 = (self.momentum_encoder(x) for x in views)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        m = momentum_at(step, self.total_steps, self.base_momentum)  # the momentum of this step's keys
        return loss, {"momentum": m}  # a Python float: made into a tensor only for the log row, not every step

    def after_step(self, step: int) -> None:
        """Once ``step`` optimiser steps are done (0: before the first), the EMA with the momentum of
        the step whose keys come next, ``momentum_at(step)``: MoCo v3's update at the start of that
        step, made after the optimiser step instead, outside any forward (under FSDP2 the momentum
        encoder's all-gather may read its shards while a forward runs). Nothing after the last step."""
        if step < self.total_steps:
            self.update_momentum_encoder(momentum_at(step, self.total_steps, self.base_momentum))

    def backbone(self) -> VisionTransformer:
        """The encoder used as the stage-1 model for evaluation (the momentum encoder)."""
        return self.momentum_encoder

    def no_weight_decay(self) -> set[str]:
        return {f"base_encoder.{n}" for n in self.base_encoder.no_weight_decay()}

    def encoders(self) -> dict[str, nn.Module]:
        return {"momentum": self.momentum_encoder, "base": self.base_encoder}

    def compile_targets(self) -> list[nn.Module]:
        return [*super().compile_targets(), self.base_encoder.head, self.momentum_encoder.head, self.predictor]


@register_method("mocov3", stage="teacher", views="two", sections={"moco": MocoConfig})
def build_mocov3(cfg: Any, device: torch.device, **_: Any) -> MoCoV3:
    """Stage 1's MoCo v3 from a :class:`~mimco.config.TeacherStageConfig`."""
    m = cfg.moco
    vit = create_vit(cfg.model, cfg.data.img_size, cfg.data.channels)
    return MoCoV3(vit, m.proj_dim, m.mlp_dim, m.temperature, m.momentum).to(device)
