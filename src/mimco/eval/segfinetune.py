"""Segmentation fine-tuning: the linear head of :mod:`mimco.eval.segmentation` on the last
``head.layers`` blocks with the whole backbone trained (layer-wise lr decay, drop path, warm-up +
cosine, joint image/mask augmentation): the method ``segfinetune``, mIoU scored every epoch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimco import distributed as dist
from mimco.config import SegmentationConfig
from mimco.data.build import BatchStream
from mimco.data.segmentation import IGNORE, load_segmentation
from mimco.errors import MimcoError
from mimco.eval.finetune import build_classifier, layer_decay_groups
from mimco.eval.segmentation import SegHead, check_backbone, evaluate_segmenter, patch_grid, upsampled
from mimco.methods.base import MethodDefaults
from mimco.methods.registry import register_method


class Segmenter(nn.Module):
    """A ViT and a :class:`SegHead`: images (B, C, S, S) -> grid logits (B, K, S/p, S/p)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, layers: int = 1) -> None:
        super().__init__()
        self.backbone, self.layers = backbone, layers
        self.head = SegHead(backbone.embed_dim * layers, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(patch_grid(self.backbone, x, self.layers))


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of grid logits upsampled to ``masks`` (B, H, W), averaged over the labelled
    pixels of the *global* batch: each process divides its sum by the all-reduced count over the
    world size, so that DDP's gradient average equals one process on the whole batch whatever
    share of ignored pixels each process holds."""
    total = F.cross_entropy(upsampled(logits, masks.shape[-2:]), masks, ignore_index=IGNORE, reduction="sum")
    count = dist.all_reduce_((masks != IGNORE).sum().float())
    return total * dist.world_size() / count.clamp(min=1)


class SegFinetune(MethodDefaults, nn.Module):
    metric_keys = ("miou", "macc", "pixel_acc", "best_miou")

    def __init__(self, model: Segmenter, cfg: SegmentationConfig, val: Any) -> None:
        super().__init__()
        self.model, self.cfg, self.val = model, cfg, val
        self.register_buffer("best", torch.tensor([-1.0, 0.0]))  # mIoU, epoch

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [images (B, C, S, S), masks (B, S, S) int64, 255 = ignored] -> (loss, {})."""
        x, masks = views
        return pixel_loss(self.model(x), masks), {}

    def backbone(self) -> VisionTransformer:
        return self.model.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"model.backbone.{n}" for n in self.model.backbone.no_weight_decay()}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's layer-decay groups for the backbone; the head at the top (lr scale 1), its
        convolution's weight decayed, BatchNorm and bias not."""
        groups = layer_decay_groups(self.model.backbone, weight_decay, self.cfg.head.layer_decay)
        head = self.model.head
        return [*groups, {"params": [head.conv.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": [head.conv.bias, *head.bn.parameters()], "weight_decay": 0.0, "lr_scale": 1.0}]

    def fsdp_units(self) -> list[nn.Module]:
        return [self.model]  # the backbone runs through forward_intermediates, which only this forward's hooks see

    def on_epoch_end(self, epoch: float) -> dict[str, float]:
        device = self.best.device
        m = evaluate_segmenter(self.model, self.val, self.cfg.data, device, precision=self.cfg.train.precision)
        if m["miou"] > float(self.best[0]):
            self.best.copy_(torch.tensor([m["miou"], epoch], device=device))
        if dist.is_main():
            print(f"[segfinetune] epoch {epoch:g}: mIoU {m['miou']:.2f}  pixel acc {m['pixel_acc']:.2f}  "
                  f"(best {float(self.best[0]):.2f})", file=sys.stderr, flush=True)
        return {"miou": round(m["miou"], 2), "macc": round(m["macc"], 2), "pixel_acc": round(m["pixel_acc"], 2),
                "best_miou": round(float(self.best[0]), 2)}


@register_method("segfinetune", stage="segfinetune", views="masks")
def build_segfinetune(cfg: SegmentationConfig, device: torch.device, stream: BatchStream, run_dir: Path,
                      backbone: VisionTransformer, **_: Any) -> SegFinetune:
    """Segmentation fine-tuning of ``backbone`` at ``data.img_size`` (its position table resampled)
    on the classes of ``stream``'s split, scored on the validation split every epoch."""
    check_backbone(backbone, cfg.head.layers, "the backbone")
    chans = backbone.patch_embed.proj.in_channels
    if cfg.data.channels != chans:
        raise MimcoError(f"the backbone takes {chans}-channel images but data.channels={cfg.data.channels}; set "
                         f"data.channels={chans}")
    val = load_segmentation(cfg.data, cfg.seg, train=False, verbose=dist.is_main())
    vit = build_classifier(backbone, 0, "token", cfg.head.drop_path_rate, cfg.data.img_size)
    return SegFinetune(Segmenter(vit, stream.num_classes, cfg.head.layers), cfg, val).to(device)
