"""The training batches of every stage, built from its config in one place (:func:`build_stream`),
so every data key (``data.cache``, ``data.on_device``, ``data.decode``) means the same in every stage.

The batches a method takes are a *view kind*, registered by name (:func:`register_views`, :func:`views_stream`;
the kinds: docs/architecture.md#contracts, "Method registry").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from mimco import distributed as dist
from mimco.config_rules import IN_MEMORY
from mimco.data.build import BatchStream, ImageArray, cached, load_dataset
from mimco.data.device_decode import DeviceViews, EncodedFiles
from mimco.data.files import FileImages
from mimco.data.segmentation import load_segmentation, seg_train_transform
from mimco.data.subsets import labelled_subset
from mimco.data.transforms import BatchMimView, BatchTwoViews, finetune_transform, image_mim_view, image_two_views
from mimco.errors import MimcoError


class TransformedArray(Dataset):
    """An in-memory :class:`ImageArray` served image by image, as PIL images through ``transform``
    (fine-tuning's per-image recipe): ``(transform(image i), label i)``."""

    def __init__(self, array: ImageArray, transform: Any) -> None:
        self.array, self.transform = array, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = to_pil_image(self.array.batch(torch.tensor([i]))[0].cpu())
        return self.transform(img), int(self.array.labels[i])


class DeviceNormalize:
    """The batch transform of fine-tuning with ``data.on_device``: uint8 images (B, C, S, S) ->
    normalised float images on ``device``, randomly erased with probability ``reprob`` (per image,
    random pixels, as the per-image recipe does)."""

    def __init__(self, mean: list[float], std: list[float], reprob: float, device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.device = device
        self.erase = RandomErasing(reprob, mode="pixel", device=device) if reprob > 0 else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return (self.erase(x) if self.erase is not None else x), 0


def _in_memory(cfg: Any, device: torch.device, transform: Any = None) -> ImageArray | FileImages:
    """The training split, in memory when the dataset is (or ``data.cache`` makes it so)."""
    data = cfg.data
    if data.cache:  # an image folder decoded once (once per node)
        return cached(load_dataset(data, train=True), data, verbose=dist.is_main(), device=device)
    return load_dataset(data, train=True, transform=transform)


def views_stream(cfg: Any, device: torch.device, batched: Callable[[bool], Any],
                 per_image: Callable[[], Callable] | None) -> BatchStream:
    """Pre-training batches of a view kind, for every kind of data: ``batched(crop)`` makes the views
    of a uint8 batch on the device (in-memory data, ``data.cache``; with ``crop=False``, for
    ``data.decode=gpu``, it takes each view's crops, ``.crops``, through ``.from_crops``), and
    ``per_image()`` the views of one PIL image in loader workers (image folders, shards, ``hf``)."""
    data = cfg.data
    if data.decode == "gpu":
        views = batched(False).to(device)
        if not hasattr(views, "from_crops"):
            raise MimcoError(f"data.decode=gpu does not apply to this method's views ({type(views).__name__} takes "
                             "whole images); use data.decode=cpu")
        ds: Any = EncodedFiles(load_dataset(data, train=True), views.crops)
        tf: Any = DeviceViews(views, data.img_size, data.channels, device)
    elif data.name in IN_MEMORY or data.cache:
        ds = _in_memory(cfg, device)
        if data.on_device:
            ds = ImageArray(ds.images.to(device), ds.labels, ds.channels)
        tf = batched(True).to(device)
    else:
        if per_image is None:
            raise MimcoError(f"this method's views are made in batches only: data.name={data.name} needs "
                             "data.cache=true (the folder decoded into memory once)")
        ds = load_dataset(data, train=True, transform=per_image())
        tf = None
    return BatchStream(ds, cfg.optim.batch_size, cfg.train.seed, device, tf, data.num_workers,
                       data.max_bad_fraction, dist.rank(), dist.world_size())


StreamBuilder = Callable[[Any, torch.device], BatchStream]
_VIEWS: dict[str, StreamBuilder] = {}


def register_views(name: str) -> Callable[[StreamBuilder], StreamBuilder]:
    """Decorator: ``build(cfg, device) -> BatchStream`` makes this process's batches for the methods
    registered with ``views=name`` (re-registering a name replaces it). A kind of pre-training views
    builds its stream with :func:`views_stream`."""

    def add(build: StreamBuilder) -> StreamBuilder:
        _VIEWS[name] = build
        return build

    return add


def view_names() -> list[str]:
    return sorted(_VIEWS)


def _pretraining(batched: Callable[..., Any], per_image: Callable[..., Callable]) -> StreamBuilder:
    """The stream of the views ``batched(aug, data, crop=crop)`` makes, or per image ``per_image(aug, data)``."""
    return lambda cfg, device: views_stream(cfg, device, lambda crop: batched(cfg.aug, cfg.data, crop=crop),
                                            lambda: per_image(cfg.aug, cfg.data))


register_views("two")(_pretraining(BatchTwoViews, image_two_views))  # MoCo v3's two asymmetric views of each image
register_views("one")(_pretraining(BatchMimView, image_mim_view))  # MimCo's (and SimMIM's) one light view of each image


@register_views("labelled")
def _labelled_stream(cfg: Any, device: torch.device) -> BatchStream:
    """Fine-tuning batches: one augmented view per image (timm's recipe, per image) and its label."""
    d = cfg.data
    tf = finetune_transform(cfg.aug, d, normalize=not d.on_device)
    train = _in_memory(cfg, device, tf)
    if d.labels_per_class or d.labels_fraction:  # few labels: the same balanced subset the probes' --per-class draws
        train = labelled_subset(train, d.labels_per_class, d.labels_fraction, d.label_seed,
                                "data.labels_per_class" if d.labels_per_class else "data.labels_fraction")
        if len(train) < cfg.optim.batch_size:
            raise MimcoError(f"optim.batch_size={cfg.optim.batch_size} exceeds the {len(train)} labelled training "
                             f"images; set optim.batch_size to at most {len(train)}")
    in_memory = isinstance(train, ImageArray)
    ds = TransformedArray(train, tf) if in_memory else train
    on_device = DeviceNormalize(d.mean[: d.channels], d.std[: d.channels], cfg.aug.reprob,
                                device) if d.on_device else None
    return BatchStream(ds, cfg.optim.batch_size, cfg.train.seed, device, on_device, d.num_workers,
                       d.max_bad_fraction, dist.rank(), dist.world_size(), labels=True,
                       num_classes=int(train.labels.max()) + 1 if in_memory else len(train.classes))


@register_views("masks")
def _mask_stream(cfg: Any, device: torch.device) -> BatchStream:
    """Segmentation batches: one jointly augmented (image, mask) pair per sample, from loader workers."""
    d = cfg.data
    train = load_segmentation(d, cfg.seg, train=True, verbose=dist.is_main())
    train.transform = seg_train_transform(cfg.aug, d)
    return BatchStream(train, cfg.optim.batch_size, cfg.train.seed, device, None, d.num_workers,
                       d.max_bad_fraction, dist.rank(), dist.world_size(), labels=True, num_classes=train.num_classes)


def build_stream(cfg: Any, device: torch.device, views: str) -> BatchStream:
    """The training batches of this process for a method taking ``views`` (a registered view kind:
    ``two``, ``one``, ``labelled``, ``masks`` or a plugin's) under ``cfg``'s data keys."""
    if views not in _VIEWS:
        raise MimcoError(f"unknown view kind '{views}'; registered: {', '.join(view_names())}")
    return _VIEWS[views](cfg, device)
