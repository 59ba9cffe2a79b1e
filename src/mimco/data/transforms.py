"""View transforms for both stages, in two forms with the same recipe:

* batched, per-sample-random transforms on uint8 tensors (kornia), used for in-memory
  datasets; they run on whatever device holds the batch;
* per-image torchvision transforms, used by loader workers for image files of any size.

Blur sigma is given for 224 px images (MoCo v3) and scaled to ``img_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia.augmentation as K
import torch
from torch import nn
from torchvision.transforms import v2

from mimco.config import ContrastiveAugConfig, DataConfig, FinetuneAugConfig, MimAugConfig


def _blur(cfg: ContrastiveAugConfig, img_size: int) -> tuple[int, tuple[float, float]]:
    scale = img_size / 224.0
    lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
    k = max(3, 2 * math.ceil(3 * hi) + 1)
    return k, (lo, hi)


class Normalize(nn.Module):
    """uint8 or [0,1] float (B, C, H, W) -> (x - mean) / std in float32."""

    def __init__(self, mean: list[float], std: list[float], channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean[:channels]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[:channels]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class BatchTwoViews(nn.Module):
    """MoCo v3's asymmetric views of a uint8 batch (B, C, S, S) -> [view1, view2], normalised.
    With ``crop=False`` the random resized crop is left out: :meth:`from_crops` then takes each
    view's crops, already at S x S (``data.decode=gpu`` crops each image as it decodes it)."""

    def __init__(self, cfg: ContrastiveAugConfig, data: DataConfig, crop: bool = True) -> None:
        super().__init__()
        s = data.img_size
        k, sigma = _blur(cfg, s)
        #: (scale, ratio) of each view's random resized crop
        self.crops = [((cfg.min_scale, 1.0), (3 / 4, 4 / 3))] * 2

        def view(blur_p: float, sol_p: float) -> nn.Sequential:
            ops: list[nn.Module] = [K.RandomResizedCrop((s, s), scale=(cfg.min_scale, 1.0))] if crop else []
            ops += [
                K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_prob),
                K.RandomGrayscale(p=cfg.grayscale_prob),
                K.RandomGaussianBlur((k, k), sigma, p=blur_p),
            ]
            if sol_p > 0:
                ops.append(K.RandomSolarize(0.0, 0.0, p=sol_p))
            ops.append(K.RandomHorizontalFlip(p=cfg.flip_prob))
            return nn.Sequential(*ops)

        self.v1 = view(cfg.blur_prob1, cfg.solarize_prob1)
        self.v2 = view(cfg.blur_prob2, cfg.solarize_prob2)
        self.norm = Normalize(data.mean, data.std, data.channels)
        self.grey = data.channels == 1

    def _run(self, seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grey:  # colour ops need 3 channels; grey in, grey out
            return self.norm(seq(x.expand(-1, 3, -1, -1))[:, :1])
        return self.norm(seq(x))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = _to_float(x)
        return [self._run(self.v1, x), self._run(self.v2, x)]

    @torch.no_grad()
    def from_crops(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views from each view's own crops (B, C, S, S) (float in [0, 1] or uint8)."""
        return [self._run(self.v1, _to_float(crops[0])), self._run(self.v2, _to_float(crops[1]))]


class BatchMimView(nn.Module):
    """MimCo's single light view (crop + flip) of a uint8 batch -> [view], normalised
    (``crop=False``: flip only, for :meth:`from_crops`)."""

    def __init__(self, cfg: MimAugConfig, data: DataConfig, crop: bool = True) -> None:
        super().__init__()
        s = data.img_size
        self.crops = [((cfg.min_scale, cfg.max_scale), tuple(cfg.ratio))]
        ops: list[nn.Module] = [K.RandomResizedCrop((s, s), scale=(cfg.min_scale, cfg.max_scale),
                                                    ratio=tuple(cfg.ratio))] if crop else []
        self.seq = nn.Sequential(*ops, K.RandomHorizontalFlip(p=cfg.flip_prob))
        self.norm = Normalize(data.mean, data.std, data.channels)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.norm(self.seq(_to_float(x)))]

    @torch.no_grad()
    def from_crops(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.norm(self.seq(_to_float(crops[0])))]


def _tv_tail(data: DataConfig) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean[: data.channels], data.std[: data.channels])]


def image_two_views(cfg: ContrastiveAugConfig, data: DataConfig) -> Callable:
    """Per-image MoCo v3 views for loader workers: PIL image -> [view1, view2]."""
    s = data.img_size
    k, sigma = _blur(cfg, s)

    def view(blur_p: float, sol_p: float) -> v2.Compose:
        return v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(s, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_prob),
            v2.RandomGrayscale(p=cfg.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(k, sigma)], p=blur_p),
            v2.RandomSolarize(128, p=sol_p), v2.RandomHorizontalFlip(p=cfg.flip_prob), *_tv_tail(data)])

    t1, t2 = view(cfg.blur_prob1, cfg.solarize_prob1), view(cfg.blur_prob2, cfg.solarize_prob2)
    return lambda img: [t1(img), t2(img)]


def image_mim_view(cfg: MimAugConfig, data: DataConfig) -> Callable:
    """Per-image MimCo view for loader workers: PIL image -> [view]."""
    t = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(data.img_size, scale=(cfg.min_scale, cfg.max_scale),
                                                           ratio=tuple(cfg.ratio), antialias=True),
                    v2.RandomHorizontalFlip(p=cfg.flip_prob), *_tv_tail(data)])
    return lambda img: [t(img)]


def image_eval(data: DataConfig) -> v2.Compose:
    """Per-image evaluation transform: resize (short side S/0.875 for large images), centre crop."""
    s = data.img_size
    resize = s if s < 64 else int(round(s / 0.875))
    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(s), *_tv_tail(data)])


def finetune_transform(aug: FinetuneAugConfig, data: DataConfig, normalize: bool = True) -> Callable:
    """timm's training transform for fine-tuning, per image (random resized crop, flip, RandAugment
    or colour jitter, then random erasing). ``normalize=False`` (``data.on_device``): it ends in a
    uint8 tensor, and normalisation and random erasing run on the device (timm's prefetcher)."""
    from timm.data import create_transform

    return create_transform(data.img_size, is_training=True, scale=(aug.min_scale, 1.0), ratio=tuple(aug.ratio),
                            hflip=aug.flip_prob, auto_augment=aug.auto_augment or None, interpolation="bicubic",
                            re_prob=aug.reprob, re_mode="pixel", mean=tuple(data.mean[: data.channels]),
                            std=tuple(data.std[: data.channels]),
                            color_jitter=0.0 if aug.auto_augment else aug.color_jitter, use_prefetcher=not normalize)
