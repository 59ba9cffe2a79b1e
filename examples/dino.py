"""A training method defined outside the package: DINO (Caron et al., ICCV 2021) on a ViT, with its
multi-crop views, in one file.

Self-distillation without labels: a student sees two global crops and ``dino.local_crops`` small
local crops of each image; an EMA teacher sees the two global crops; the student's softmax over
``dino.out_dim`` prototypes (temperature ``dino.student_temp``) matches the teacher's, centred
(running mean of the teacher's outputs over the global batch, momentum ``dino.center_momentum``)
and sharpened (``dino.teacher_temp``, warmed up from ``dino.warmup_teacher_temp``), over every
(teacher crop, other student crop) pair. The file registers the method with its ``dino:`` section
and the view kind ``multicrop``; mimco loads it as a plugin::

    mimco teacher --plugin examples/dino.py --config fmnist_teacher method=dino dino.local_crops=6
    torchrun --nproc_per_node 8 -m mimco teacher --plugin examples/dino.py method=dino data.root=... \\
        train.strategy=fsdp

The teacher is the evaluated encoder (``encoders()``: ``momentum`` = teacher, ``base`` = student),
so the run's checkpoint serves as stage 2's frozen teacher as it is
(``mimco pretrain teacher.checkpoint=runs/<dino run>/last.pt``). The global crops take the
``aug:`` section's colour, blur and solarize keys (MoCo v3's and DINO's are the same recipe), with
``dino.global_scale`` for their crop; local crops are blurred with probability
``dino.local_blur_prob`` and never solarized. Left out of DINO's recipe: freezing the last layer
in the first epoch and the weight decay schedule (``optim.weight_decay`` is constant).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import v2

from mimco import distributed as dist
from mimco.config import setting
from mimco.data.stream import register_views, views_stream
from mimco.data.transforms import (
    BatchTwoViews,
    ColorJitter,
    Normalize,
    RandomGaussianBlur,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    blur_kernel,
    image_two_views,
    tensor_tail,
)
from mimco.errors import MimcoError
from mimco.methods import MethodDefaults, register_method
from mimco.methods.moco import momentum_at
from mimco.models import create_vit


@dataclass
class DinoConfig:
    """The ``dino:`` section (DINO's ViT-S/16 defaults, ``out_dim`` aside: DINO uses 65536)."""

    out_dim: int = setting(4096, min=1, what="the number of prototypes", fixed=True)
    hidden_dim: int = setting(2048, min=1, what="the head MLP's hidden width", fixed=True)
    bottleneck_dim: int = setting(256, min=1, what="the head's bottleneck width", fixed=True)
    local_crops: int = setting(6, min=0, what="local crops per image")
    local_size: int = setting(0, min=0, what="the local crops' side (0 = 96/224 of data.img_size, in whole patches)")
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # the local crops' share of the image
    local_blur_prob: float = 0.5  # the local crops' Gaussian blur probability
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # the global crops' share of the image
    student_temp: float = setting(0.1, above=0, what="the student's softmax temperature")
    teacher_temp: float = setting(0.04, above=0, what="the teacher's softmax temperature")
    warmup_teacher_temp: float = setting(0.04, above=0, what="the teacher's temperature at step 0")
    warmup_teacher_temp_epochs: float = setting(0.0, min=0, what="the teacher temperature's warm-up")
    momentum: float = 0.996  # the teacher's EMA momentum, rising to 1 on a per-iteration cosine
    center_momentum: float = 0.9  # the centre's running-mean momentum, per step, in [0, 1)

    def check(self) -> None:
        for key in ("local_scale", "global_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise MimcoError(f"dino.{key}={[lo, hi]} must satisfy 0 < low <= high <= 1, e.g. [0.05, 0.4]")
        if not 0 <= self.center_momentum < 1:
            raise MimcoError(f"dino.center_momentum={self.center_momentum:g} must lie in [0, 1), e.g. 0.9")


def local_side(cfg: Any) -> int:
    """The local crops' side: ``dino.local_size``, or 96/224 of the image's, in whole patches."""
    p = cfg.model.patch_size
    return cfg.dino.local_size or max(p, round(cfg.data.img_size * 96 / 224 / p) * p)


class MultiCrop(nn.Module):
    """DINO's views of a uint8 batch (B, C, S, S) on the device: [global 1, global 2, local 1, ...],
    normalised; the globals MoCo v3's asymmetric pair at ``dino.global_scale``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        aug, data, d = cfg.aug, cfg.data, cfg.dino
        self.globals = BatchTwoViews(dataclasses.replace(aug, min_scale=d.global_scale[0]), data)
        self.globals.v1[0].scale = self.globals.v2[0].scale = tuple(d.global_scale)
        size = local_side(cfg)
        k, sigma = blur_kernel(aug, size)
        self.local = nn.Sequential(
            RandomResizedCrop(size, scale=tuple(d.local_scale)),
            ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=aug.jitter_prob),
            RandomGrayscale(p=aug.grayscale_prob), RandomGaussianBlur(k, sigma, p=d.local_blur_prob),
            RandomHorizontalFlip(p=aug.flip_prob))
        self.norm, self.grey, self.n = Normalize(data.mean, data.std, data.channels), data.channels == 1, d.local_crops

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = self.globals(x)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        x = x.expand(-1, 3, -1, -1) if self.grey else x  # colour ops need 3 channels; grey in, grey out
        for _ in range(self.n):
            y = self.local(x)
            views.append(self.norm(y[:, :1] if self.grey else y))
        return views


def image_multicrop(cfg: Any) -> Any:
    """The same views of one PIL image, in loader workers (image folders, shards, Hugging Face data)."""
    aug, data, d = cfg.aug, cfg.data, cfg.dino
    two = image_two_views(dataclasses.replace(aug, min_scale=d.global_scale[0]), data)
    size = local_side(cfg)
    k, sigma = blur_kernel(aug, size)
    local = v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(size, scale=tuple(d.local_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_prob),
        v2.RandomGrayscale(p=aug.grayscale_prob), v2.RandomApply([v2.GaussianBlur(k, sigma)], p=d.local_blur_prob),
        v2.RandomHorizontalFlip(p=aug.flip_prob), *tensor_tail(data)])
    return lambda img: [*two(img), *(local(img) for _ in range(d.local_crops))]


@register_views("multicrop")
def multicrop_stream(cfg: Any, device: torch.device) -> Any:
    """2 global and ``dino.local_crops`` local views of each image."""
    return views_stream(cfg, device, lambda crop: MultiCrop(cfg), lambda: image_multicrop(cfg))


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU) to ``bottleneck_dim``, L2-normalised, then a
    bias-free linear layer with unit-norm rows (DINO's weight-normalised last layer with its norm
    frozen at 1). (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """The mean over (teacher crop i, student crop v != i) of the cross-entropy between the teacher's
    centred, sharpened softmax and the student's: student [(B, K)] x V crops, teacher [(B, K)] x 2, in fp32."""
    q = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
    logp = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [(-qi * lv).sum(-1).mean() for i, qi in enumerate(q) for v, lv in enumerate(logp) if v != i]
    return torch.stack(terms).mean()


def dynamic(vit: VisionTransformer) -> VisionTransformer:
    """``vit`` taking any multiple of its patch size (the position table resampled per forward, as
    timm's ``dynamic_img_size=True``), for the student's local crops."""
    vit.dynamic_img_size = True
    vit.patch_embed.strict_img_size, vit.patch_embed.flatten = False, False
    vit.patch_embed.output_fmt = Format.NHWC
    return vit


class DINO(MethodDefaults, nn.Module):
    """The student (ViT + :class:`DINOHead`), its EMA teacher, and the teacher outputs' centre."""

    def __init__(self, vit: VisionTransformer, cfg: DinoConfig, epochs: float) -> None:
        super().__init__()
        vit.head = DINOHead(vit.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.teacher = copy.deepcopy(vit)  # global crops only: the fixed-size ViT
        self.teacher.requires_grad_(False)
        self.student = dynamic(vit)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.cfg, self.epochs = cfg, epochs

    def teacher_temp(self, step: int) -> float:
        """Linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up, then constant."""
        warm = self.total_steps * self.cfg.warmup_teacher_temp_epochs / self.epochs
        if step >= warm:
            return self.cfg.teacher_temp
        return self.cfg.warmup_teacher_temp + (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp) * step / warm

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """views: 2 global (B, C, S, S) and N local (B, C, s, s) crops -> (loss, logs)."""
        b = len(views[0])
        with torch.no_grad():
            t = self.teacher(torch.cat(views[:2]))  # (2B, K)
        out = self.student(torch.cat(views[:2])).chunk(2)
        if len(views) > 2:
            out += self.student(torch.cat(views[2:])).chunk(len(views) - 2)
        temp = self.teacher_temp(step)
        loss = dino_loss(list(out), list(t.split(b)), self.center, self.cfg.student_temp, temp)
        if self.training:  # the centre for the next micro-batch: the global batch's mean teacher output
            with torch.no_grad():
                batch = dist.all_reduce_mean(t.float().mean(0, keepdim=True))
                self.center.mul_(self.cfg.center_momentum).add_(batch, alpha=1 - self.cfg.center_momentum)
        # the teacher's entropy: near log(out_dim) when it is uniform (collapse by flattening), 0 when one-hot
        p = F.softmax((t.float() - self.center) / temp, dim=-1)
        return loss, {"teacher_entropy": -(p * p.clamp_min(1e-12).log()).sum(-1).mean(), "teacher_temp": temp}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The teacher's EMA of the student, with the momentum of the step that comes next."""
        if step < self.total_steps:
            m = momentum_at(step, self.total_steps, self.cfg.momentum)
            teacher, student = list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()]
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def backbone(self) -> VisionTransformer:
        return self.teacher  # DINO evaluates (and a stage-2 run distils from) the teacher

    def encoders(self) -> dict[str, nn.Module]:
        return {"momentum": self.teacher, "base": self.student}

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}

    def compile_targets(self) -> list[nn.Module]:
        return [*super().compile_targets(), self.student.head, self.teacher.head]


@register_method("dino", stage="teacher", views="multicrop", sections={"dino": DinoConfig})
def build_dino(cfg: Any, device: torch.device, **inputs: Any) -> DINO:
    """DINO from a stage-1 config: ``model`` for the ViT, ``dino`` for the rest."""
    if cfg.dino.local_size % cfg.model.patch_size:
        raise MimcoError(f"dino.local_size={cfg.dino.local_size} is not a multiple of model.patch_size="
                         f"{cfg.model.patch_size}; the local crops must tile into patches")
    vit = create_vit(cfg.model, cfg.data.img_size, cfg.data.channels)
    return DINO(vit, cfg.dino, cfg.optim.epochs).to(device)
