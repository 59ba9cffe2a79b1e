"""A training method defined outside the package: SimSiam (Chen & He, CVPR 2021) on a ViT.

One file is the whole cost: the method (an ``nn.Module`` keeping the contract of
:class:`mimco.methods.TrainingMethod`), its config section (``simsiam:``, checked like every other
key and written to the run's ``config.yaml``), and its builder registered by name. mimco loads it
as a plugin (``--plugin FILE``, or an installed package's ``mimco.plugins`` entry point), and every
stage feature then applies to it unchanged: config files and overrides, DDP and FSDP under
torchrun, ``train.compile``, bf16, resume, the k-NN at the end, ``mimco export``::

    mimco teacher --plugin examples/simsiam.py --config fmnist_teacher method=simsiam simsiam.proj_dim=128
    torchrun --nproc_per_node 8 -m mimco teacher --plugin examples/simsiam.py method=simsiam data.root=... \
        train.strategy=fsdp

It trains in the stage-1 slot (``mimco teacher``: two augmented views per image, MoCo v3's
augmentation); ``python examples/simsiam.py teacher ...`` works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco.config import setting
from mimco.methods import MethodDefaults, register_method
from mimco.models import MoCoMLP, create_vit


@dataclass
class SimSiamConfig:
    """The ``simsiam:`` section."""

    proj_dim: int = setting(256, min=1, what="the projection width", fixed=True)
    hidden_dim: int = setting(4096, min=1, what="the projector's and predictor's hidden width", fixed=True)


class SimSiam(MethodDefaults, nn.Module):
    """An encoder with a 3-layer projector as its head, a 2-layer predictor, and the symmetric
    negative cosine between each view's prediction and the other view's (stopped) projection."""

    def __init__(self, backbone: VisionTransformer, proj_dim: int = 256, hidden_dim: int = 4096) -> None:
        super().__init__()
        backbone.head = MoCoMLP(3, backbone.embed_dim, hidden_dim, proj_dim)
        self.encoder = backbone
        self.predictor = MoCoMLP(2, proj_dim, hidden_dim, proj_dim, last_bn=False)

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [x1, x2], each (B, C, H, W) -> (loss in [-1, 1], logs)."""
        z1, z2 = self.encoder(views[0]), self.encoder(views[1])  # (B, proj_dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
                       + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())
        # the spread of the normalised projections: 1/sqrt(proj_dim) when healthy, 0 when collapsed
        return loss, {"z_std": F.normalize(z1.detach().float(), dim=-1).std(0).mean()}

    def backbone(self) -> VisionTransformer:
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def compile_targets(self) -> list[nn.Module]:
        return [*super().compile_targets(), self.encoder.head, self.predictor]


@register_method("simsiam", stage="teacher", views="two", sections={"simsiam": SimSiamConfig})
def build_simsiam(cfg: Any, device: torch.device, **inputs: Any) -> SimSiam:
    """SimSiam from a stage-1 config: ``model`` for the ViT, ``simsiam`` for its widths."""
    vit = create_vit(cfg.model, cfg.data.img_size, cfg.data.channels)
    return SimSiam(vit, cfg.simsiam.proj_dim, cfg.simsiam.hidden_dim).to(device)


if __name__ == "__main__":
    from mimco.cli.main import main

    raise SystemExit(main())
