"""Datasets by name, and the deterministic, resumable stream of training batches."""

from __future__ import annotations

import atexit
import typing
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mimco import distributed as dist
from mimco.config import DataConfig, DatasetName
from mimco.data import fashion_mnist, procedural
from mimco.data.files import BadImageCounter, FileImages, Substituting, collate_substituted, worker_ignores_stop
from mimco.data.hf import HFImages, load_split
from mimco.data.scenes import pretraining_scenes
from mimco.data.shards import ShardImages, describe
from mimco.errors import MimcoError

DATASETS = typing.get_args(DatasetName)


@dataclass
class ImageArray:
    """An in-memory dataset: uint8 images (N, C, S, S) and int64 labels (N,) (-1 if unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    channels: int  # channels the model expects; grey images are expanded on access

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.images[idx]
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] != self.channels else x


def _array(images: np.ndarray, labels: np.ndarray, cfg: DataConfig) -> ImageArray:
    x = torch.from_numpy(np.array(images, copy=True))
    if x.ndim == 3:
        x = x[:, None]
    if cfg.channels not in (1, 3):
        raise MimcoError(f"data.channels must be 1 or 3, got {cfg.channels}")
    if x.shape[1] == 3 and cfg.channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)
    if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size:
        x = F.interpolate(x.float(), size=(cfg.img_size, cfg.img_size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return ImageArray(x.contiguous(), torch.from_numpy(labels).long(), cfg.channels)


def _torchvision(cls_name: str, cfg: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    root = cfg.root or "data"
    try:
        ds = getattr(torchvision.datasets, cls_name)(root, train=train, download=cfg.download)
    except RuntimeError as e:
        raise MimcoError(f"{cls_name} not found in {root} ({str(e).splitlines()[0]}); set data.root or "
                         "data.download=true") from None
    return np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets)


def load_dataset(cfg: DataConfig, train: bool = True,
                 transform: Callable | None = None) -> ImageArray | FileImages | None:
    """The train (or test) split of ``cfg.name``; ``None`` when the dataset has no test split.
    In-memory datasets as :class:`ImageArray` at ``img_size``; file datasets as :class:`FileImages`
    whose items pass through ``transform``."""
    name, subset = cfg.name, cfg.subset if train else 0
    if name == "segfolder":
        raise MimcoError(f"data.name={name} is segmentation data (images with masks): use it with `mimco segprobe` or "
                         "`mimco segfinetune`")
    if name == "fashion_mnist":
        ds = _array(*fashion_mnist.load_fashion_mnist(cfg.root, train, cfg.download), cfg)
    elif name == "fmnist_scenes":  # pre-training on the segmentation scenes' domain, without their masks
        ds = _array(*pretraining_scenes(*fashion_mnist.load_fashion_mnist(cfg.root, train, cfg.download), train), cfg)
    elif name in ("cifar10", "cifar100"):
        ds = _array(*_torchvision(name.upper(), cfg, train), cfg)
    elif name == "procedural":
        ds = _array(*procedural.make_shapes(cfg.procedural_size, cfg.img_size, seed=0 if train else 1), cfg)
    elif name == "shards":
        desc = describe(cfg.root, train, cfg.val_root)
        if desc is None:
            return None
        return ShardImages(desc, channels=cfg.channels, transform=transform, subset=subset,
                           shuffle_buffer=cfg.shuffle_buffer if train else 0, verbose=dist.is_main())
    elif name == "hf":
        split = load_split(cfg.root, train, cfg.val_root)
        if split is None:
            return None
        source = cfg.val_root if cfg.val_root and not train else cfg.root
        return HFImages(split, source, cfg.image_column, cfg.label_column, cfg.channels, transform, subset)
    else:  # imagefolder, folder
        root = Path(cfg.root)
        if split := (root / "train").is_dir():
            root = root / ("train" if train else "val")
        if not train and not (split and root.is_dir()):
            return None
        return FileImages(str(root), labelled=name == "imagefolder", channels=cfg.channels, transform=transform,
                          subset=subset)
    if subset:
        ds = ImageArray(ds.images[:subset], ds.labels[:subset], ds.channels)
    return ds


def cached(files: FileImages, cfg: DataConfig, verbose: bool = True, device: torch.device | None = None) -> ImageArray:
    """``data.cache``: the folder decoded once (once per node under torchrun) into an in-memory
    dataset (:mod:`mimco.data.cache`); ``device``: the process group's, for its one collective."""
    from mimco.data.cache import decode_all

    size = cfg.cache_size or cfg.img_size
    return ImageArray(*decode_all(files, size, cfg.num_workers, cfg.max_bad_fraction, verbose, device), cfg.channels)


def class_names(cfg: DataConfig, dataset: ImageArray | FileImages | None = None) -> list[str] | None:
    """Human-readable class names where the dataset defines them."""
    if cfg.name in ("fashion_mnist", "fmnist_scenes"):  # a scene is labelled with the class covering most of it
        return fashion_mnist.CLASSES
    if cfg.name == "procedural":
        return procedural.CLASSES
    return dataset.classes if isinstance(dataset, FileImages) and dataset.classes else None


def _close(ref: weakref.ReferenceType) -> None:
    stream = ref()
    if stream is not None:
        stream.close()


class BatchStream:
    """Training batches for steps ``start, start+1, ...``, identical across resumes.

    Epoch ``e`` visits the images in a seeded permutation; step ``s`` takes global batch
    ``s % steps_per_epoch`` of it and this process its contiguous slice. In-memory batches are
    augmented by ``batch_transform`` on ``device``; other datasets (any map-style dataset of
    ``(sample, label)``) per image in loader workers, or by ``batch_transform`` after the dataset's
    ``collate`` (``data.decode=gpu``). Yields a list of views, each (B_local, C, S, S), then the
    labels (B_local,) when ``labels``."""

    def __init__(self, dataset: ImageArray | FileImages, global_batch: int, seed: int, device: torch.device,
                 batch_transform: Callable | None = None, num_workers: int = 2, max_bad_fraction: float = 0.01,
                 rank: int = 0, world_size: int = 1, labels: bool = False, num_classes: int = 0) -> None:
        if global_batch % world_size:
            raise MimcoError(f"optim.batch_size={global_batch} is not divisible by the {world_size} processes")
        if len(dataset) < global_batch:
            raise MimcoError(f"optim.batch_size={global_batch} is larger than the dataset ({len(dataset)} images); "
                             "lower it")
        self.ds, self.gb, self.seed, self.device = dataset, global_batch, seed, device
        self.batch_transform, self.num_workers = batch_transform, num_workers
        self.rank, self.world, self.labels = rank, world_size, labels
        self.num_classes = num_classes  # labelled streams: the classes of the training set
        self.local = global_batch // world_size
        self.steps_per_epoch = len(dataset) // global_batch
        self.bad = BadImageCounter(max_bad_fraction, len(dataset))
        self._rows: list[list[int]] = []  # the loader's batch sampler: its batches replaced each epoch
        self._loader: DataLoader | None = None

    @property
    def reads_files(self) -> bool:
        """Whether batches come from loader workers (files, which may be unreadable), not memory."""
        return not isinstance(self.ds, ImageArray)

    def _file_loader(self) -> DataLoader:
        """One loader for the whole run: its workers persist across epochs."""
        if self._loader is None:
            w = self.num_workers
            # its own generator: starting an iteration must not draw from the global one, which the
            # training step's randomness (drop path, mixup) shares and a resume restores
            self._loader = DataLoader(Substituting(self.ds, self.seed), batch_sampler=self._rows, num_workers=w,
                                      collate_fn=getattr(self.ds, "collate", collate_substituted),
                                      generator=torch.Generator().manual_seed(self.seed),
                                      pin_memory=self.device.type == "cuda", persistent_workers=w > 0,
                                      worker_init_fn=worker_ignores_stop,
                                      prefetch_factor=4 if w > 0 else None)
            if w > 0:  # before multiprocessing's own exit, which would wait out the workers' signal grace
                atexit.register(_close, weakref.ref(self))
        return self._loader

    def close(self) -> None:
        """Shut the loader's worker processes down (they persist across epochs); a later batch
        starts new ones."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None

    def _local_indices(self, epoch: int, first: int) -> torch.Tensor:
        source = getattr(self.ds, "files", self.ds)  # the GPU decode's encoded files: their images
        order = getattr(source, "epoch_order", None)  # shards with data.shuffle_buffer: a shard-local order
        perm = order(self.seed, epoch) if order is not None else None
        if perm is None:
            perm = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        perm = perm[: self.steps_per_epoch * self.gb].view(self.steps_per_epoch, self.gb)
        return perm[first:, self.rank * self.local : (self.rank + 1) * self.local]

    def __call__(self, start_step: int) -> Iterator[list[torch.Tensor]]:
        step = start_step
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            idx = self._local_indices(epoch, first)
            if isinstance(self.ds, ImageArray):
                # images on the device (data.on_device): the epoch's index goes there once, not a host
                # index each step (copied to the device, blocking, before every batch)
                at = idx.to(self.ds.images.device, non_blocking=True)
                for row, host_row in zip(at, idx):
                    x = self.ds.batch(row).to(self.device, non_blocking=True)
                    views = self.batch_transform(x)
                    yield [*views, self.ds.labels[host_row].to(self.device)] if self.labels else views
            else:
                # the persistent loader picks up this epoch's order; keys epoch * N + i seed each image's views
                self._rows[:] = (idx + epoch * len(self.ds)).tolist()
                for (views, labels), unreadable in self._file_loader():
                    undecodable = 0
                    if self.batch_transform is not None:  # data.decode=gpu: encoded images, decoded on the device
                        views, undecodable = self.batch_transform(views)
                    # unreadable files were replaced: full batches, read on top of the ones met
                    self.bad.update(self.local + len(unreadable) + undecodable, unreadable, undecodable)
                    views = list(views) if isinstance(views, (list, tuple)) else [views]
                    if self.labels:
                        views.append(labels)
                    yield [v.to(self.device, non_blocking=True) for v in views]
            step = (epoch + 1) * self.steps_per_epoch
