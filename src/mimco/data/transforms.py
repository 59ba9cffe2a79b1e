"""View transforms for both stages, in two forms with the same recipe:

* batched, per-sample-random transforms on uint8 tensors (in-memory datasets), run on the batch's
  device with their random parameters drawn there, so a step neither copies a parameter to the
  device nor waits for it (``tests/engine/test_host_sync.py`` runs them on the meta device);
* per-image torchvision transforms, used by loader workers for image files of any size.

Both follow torchvision's definitions, each op applied per image with its probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from mimco.config import ContrastiveAugConfig, DataConfig, FinetuneAugConfig, MimAugConfig


def blur_kernel(cfg: ContrastiveAugConfig, img_size: int) -> tuple[int, tuple[float, float]]:
    """MoCo v3's Gaussian blur at ``img_size``: (kernel side, sigma range), both scaled from 224 px."""
    scale = img_size / 224.0
    lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
    return max(3, 2 * math.ceil(3 * hi) + 1), (lo, hi)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class Normalize(nn.Module):
    """uint8 or [0,1] float (B, C, H, W) -> (x - mean) / std in float32."""

    def __init__(self, mean: list[float], std: list[float], channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean[:channels]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[:channels]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _uniform(x: torch.Tensor, lo: float, hi: float, *shape: int) -> torch.Tensor:
    """Uniform draws in [lo, hi) on ``x``'s device, (B, *shape)."""
    return torch.empty(len(x), *shape, device=x.device).uniform_(lo, hi)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB images (ITU-R 601, as torchvision and kornia)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


class RandomResizedCrop(nn.Module):
    """torchvision's random resized crop, per image and batched: 10 tries of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, the first that fits taken (the whole image,
    its ratio clamped, when none does), resampled bilinearly to ``size`` x ``size``."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 tries: int = 10) -> None:
        super().__init__()
        self.size, self.scale, self.ratio, self.tries = size, scale, ratio, tries

    def boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's crop (left, top, width, height) in pixels, (B,) each, on ``x``'s device."""
        h_in, w_in = x.shape[-2:]
        area = h_in * w_in * _uniform(x, *self.scale, self.tries)
        r = _uniform(x, math.log(self.ratio[0]), math.log(self.ratio[1]), self.tries).exp()
        w, h = (area * r).sqrt().round(), (area / r).sqrt().round()
        fits = (w >= 1) & (w <= w_in) & (h >= 1) & (h <= h_in)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
        found = fits.any(1)
        in_ratio = w_in / h_in  # the fallback: the whole image, its ratio clamped to ``ratio``, centred
        fw, fh = ((w_in, round(w_in / self.ratio[0])) if in_ratio < self.ratio[0] else
                  (round(h_in * self.ratio[1]), h_in) if in_ratio > self.ratio[1] else (w_in, h_in))
        w = torch.where(found, w.gather(1, first).squeeze(1), fw)
        h = torch.where(found, h.gather(1, first).squeeze(1), fh)
        x0 = torch.where(found, (_uniform(x, 0, 1) * (w_in - w + 1)).floor(), (w_in - fw) // 2)
        y0 = torch.where(found, (_uniform(x, 0, 1) * (h_in - h + 1)).floor(), (h_in - fh) // 2)
        return x0, y0, w, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h_in, w_in = x.shape
        x0, y0, w, h = self.boxes(x)
        zero = torch.zeros_like(w)
        # output coordinate o in [-1, 1] -> the crop's pixels [x0, x0 + w) (align_corners=False)
        theta = torch.stack([torch.stack([w / w_in, zero, (2 * x0 + w) / w_in - 1], 1),
                             torch.stack([zero, h / h_in, (2 * y0 + h) / h_in - 1], 1)], 1)
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        # no pixel from outside the crop: its edge pixels repeat, as resizing the sliced crop does
        lo = torch.stack([(2 * x0 + 1) / w_in - 1, (2 * y0 + 1) / h_in - 1], 1).view(b, 1, 1, 2)
        hi = torch.stack([(2 * (x0 + w) - 1) / w_in - 1, (2 * (y0 + h) - 1) / h_in - 1], 1).view(b, 1, 1, 2)
        grid = torch.maximum(torch.minimum(grid, hi), lo)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eq = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eq, ones, maxc)
    div = torch.where(eq, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    return torch.remainder((hr + hg + hb) / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = torch.remainder(i, 6).long().unsqueeze(1)
    p, q, t = ((v * (1.0 - s)).clamp(0, 1), (v * (1.0 - s * f)).clamp(0, 1), (v * (1.0 - s * (1.0 - f))).clamp(0, 1))
    pick = lambda *a: torch.stack(a, 1).gather(1, i)  # noqa: E731  (the sector's value for each pixel)
    return torch.cat([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], 1)


class _PerImage(nn.Module):
    """A subclass's ``op(x)`` applied to each image with probability ``p`` (its own draws made first)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.op(x)
        return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < self.p, out, x)


class ColorJitter(_PerImage):
    """torchvision's colour jitter on RGB images in [0, 1], per image, applied with probability ``p``:
    brightness, contrast and saturation factors drawn in [max(0, 1 - a), 1 + a], hue in [-h, h]
    turns, the four in a random order (one per batch, as kornia's)."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0) -> None:
        super().__init__(p)
        self.ranges = [(max(0.0, 1 - a), 1 + a) for a in (brightness, contrast, saturation)] + [(-hue, hue)]

    def op(self, x: torch.Tensor) -> torch.Tensor:
        f = [_uniform(x, lo, hi, 1, 1, 1) for lo, hi in self.ranges]
        out = x
        for k in torch.randperm(4).tolist():  # host randomness for the order: no device value read
            if k == 0:
                out = (out * f[0]).clamp(0, 1)
            elif k < 3:  # contrast: towards the mean grey; saturation: towards each pixel's grey
                ref = _grey(out).mean((1, 2, 3), keepdim=True) if k == 1 else _grey(out)
                out = (ref + (out - ref) * f[k]).clamp(0, 1)
            else:
                h, s, v = _rgb_to_hsv(out)
                out = _hsv_to_rgb(torch.remainder(h + f[3][:, 0], 1.0), s, v)
        return out


class RandomGrayscale(_PerImage):
    def op(self, x: torch.Tensor) -> torch.Tensor:
        return _grey(x).expand_as(x)


class RandomGaussianBlur(_PerImage):
    """A ``k`` x ``k`` Gaussian blur, its sigma drawn per image in ``sigma``, reflect padding (kornia's
    default border), applied with probability ``p``."""

    def __init__(self, k: int, sigma: tuple[float, float], p: float) -> None:
        super().__init__(p)
        self.k, self.sigma = k, sigma

    def op(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        sigma = _uniform(x, *self.sigma, 1)
        pos = torch.arange(self.k, device=x.device, dtype=x.dtype) - (self.k - 1) / 2
        kern = torch.exp(-(pos**2) / (2 * sigma**2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, k)
        pad = self.k // 2
        y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, kern.view(b * c, 1, 1, self.k), groups=b * c)
        return F.conv2d(y, kern.view(b * c, 1, self.k, 1), groups=b * c).view(b, c, h, w)


class RandomSolarize(_PerImage):
    """Pixels at or above 0.5 inverted, with probability ``p``."""

    def op(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < 0.5, x, 1.0 - x)


class RandomHorizontalFlip(_PerImage):
    def op(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)


class BatchTwoViews(nn.Module):
    """MoCo v3's asymmetric views of a uint8 batch (B, C, S, S) -> [view1, view2], normalised.
    With ``crop=False`` the random resized crop is left out: :meth:`from_crops` then takes each
    view's crops, already at S x S (``data.decode=gpu`` crops each image as it decodes it)."""

    def __init__(self, cfg: ContrastiveAugConfig, data: DataConfig, crop: bool = True) -> None:
        super().__init__()
        s = data.img_size
        k, sigma = blur_kernel(cfg, s)
        #: (scale, ratio) of each view's random resized crop
        self.crops = [((cfg.min_scale, 1.0), (3 / 4, 4 / 3))] * 2

        def view(blur_p: float, sol_p: float) -> nn.Sequential:
            ops: list[nn.Module] = [RandomResizedCrop(s, *self.crops[0])] if crop else []
            ops += [ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_prob),
                    RandomGrayscale(p=cfg.grayscale_prob), RandomGaussianBlur(k, sigma, p=blur_p)]
            ops += [RandomSolarize(p=sol_p)] if sol_p > 0 else []  # none: no draw for it
            return nn.Sequential(*ops, RandomHorizontalFlip(p=cfg.flip_prob))

        self.v1 = view(cfg.blur_prob1, cfg.solarize_prob1)
        self.v2 = view(cfg.blur_prob2, cfg.solarize_prob2)
        self.norm = Normalize(data.mean, data.std, data.channels)
        self.grey = data.channels == 1

    def _run(self, seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grey:  # colour ops need 3 channels; grey in, grey out
            return self.norm(seq(x.expand(-1, 3, -1, -1))[:, :1])
        return self.norm(seq(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.from_crops([_to_float(x)] * 2)

    @torch.no_grad()
    def from_crops(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views from each view's own crops (B, C, S, S) (float in [0, 1] or uint8)."""
        return [self._run(self.v1, _to_float(crops[0])), self._run(self.v2, _to_float(crops[1]))]


class BatchMimView(nn.Module):
    """MimCo's single light view (crop + flip) of a uint8 batch -> [view], normalised
    (``crop=False``: flip only, for :meth:`from_crops`)."""

    def __init__(self, cfg: MimAugConfig, data: DataConfig, crop: bool = True) -> None:
        super().__init__()
        self.crops = [((cfg.min_scale, cfg.max_scale), tuple(cfg.ratio))]
        ops: list[nn.Module] = [RandomResizedCrop(data.img_size, *self.crops[0])] if crop else []
        self.seq = nn.Sequential(*ops, RandomHorizontalFlip(p=cfg.flip_prob))
        self.norm = Normalize(data.mean, data.std, data.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.from_crops([x])

    @torch.no_grad()
    def from_crops(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.norm(self.seq(_to_float(crops[0])))]


def tensor_tail(data: DataConfig) -> list[Callable]:
    """The last steps of a per-image transform: uint8 tensor -> float in [0, 1] -> normalised."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean[: data.channels], data.std[: data.channels])]


def image_two_views(cfg: ContrastiveAugConfig, data: DataConfig) -> Callable:
    """Per-image MoCo v3 views for loader workers: PIL image -> [view1, view2]."""
    s = data.img_size
    k, sigma = blur_kernel(cfg, s)

    def view(blur_p: float, sol_p: float) -> v2.Compose:
        return v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(s, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_prob),
            v2.RandomGrayscale(p=cfg.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(k, sigma)], p=blur_p),
            v2.RandomSolarize(128, p=sol_p), v2.RandomHorizontalFlip(p=cfg.flip_prob), *tensor_tail(data)])

    t1, t2 = view(cfg.blur_prob1, cfg.solarize_prob1), view(cfg.blur_prob2, cfg.solarize_prob2)
    return lambda img: [t1(img), t2(img)]


def image_mim_view(cfg: MimAugConfig, data: DataConfig) -> Callable:
    """Per-image MimCo view for loader workers: PIL image -> [view]."""
    t = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(data.img_size, scale=(cfg.min_scale, cfg.max_scale),
                                                           ratio=tuple(cfg.ratio), antialias=True),
                    v2.RandomHorizontalFlip(p=cfg.flip_prob), *tensor_tail(data)])
    return lambda img: [t(img)]


def image_eval(data: DataConfig) -> v2.Compose:
    """Per-image evaluation transform: resize (short side S/0.875 for large images), centre crop."""
    s = data.img_size
    resize = s if s < 64 else int(round(s / 0.875))
    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(s), *tensor_tail(data)])


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
