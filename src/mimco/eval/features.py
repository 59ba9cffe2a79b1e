"""Frozen features of a backbone (or raw pixels) over a whole split, in inference mode."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mimco import distributed as dist
from mimco.config import DataConfig
from mimco.data.build import ImageArray
from mimco.data.files import FileImages, collate_skip_bad, worker_ignores_stop
from mimco.data.transforms import Normalize, image_eval
from mimco.engine.amp import autocast


def eval_batches(dataset: ImageArray | FileImages, data: DataConfig, batch_size: int, device: torch.device,
                 indices: torch.Tensor | None = None):
    """Normalised, un-augmented (images (B, C, S, S) on ``device``, labels (B,)) over a whole split
    (or the images at ``indices``, in that order). Unreadable files are left out."""
    order = torch.arange(len(dataset)) if indices is None else indices
    if isinstance(dataset, ImageArray):
        norm = Normalize(data.mean, data.std, data.channels)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield norm(dataset.batch(idx).to(device)), dataset.labels[idx]
    else:
        dataset.transform = image_eval(data)
        part = dataset if indices is None else Subset(dataset, order.tolist())
        loader = DataLoader(part, batch_size=batch_size, num_workers=data.num_workers, collate_fn=collate_skip_bad,
                            worker_init_fn=worker_ignores_stop)
        for batch, _ in loader:
            if batch is not None:
                yield batch[0].to(device), batch[1]


def features_of(backbone: torch.nn.Module | None, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """(B, C, H, W) -> (B, D): CLS after the final norm, the mean of patch tokens, or raw pixels."""
    if backbone is None:
        return x.flatten(1)
    if pool not in ("cls", "mean"):
        raise ValueError(f"unknown pool '{pool}'")
    tokens = backbone.forward_features(x)  # every timm family (ViT, DeiT, EVA); for a ViT the same as encode(x)
    return tokens[:, 0] if pool == "cls" else tokens[:, backbone.num_prefix_tokens :].mean(1)


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module | None, dataset: ImageArray | FileImages, data: DataConfig,
                     device: torch.device, batch_size: int = 512,
                     pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)): :func:`features_of` with ``pool`` (``cls`` or
    ``mean``); ``backbone=None``: the normalised raw pixels, flattened (the honest floor)."""
    if backbone is not None:
        was_training = backbone.training
        backbone.eval()
    feats, labels = [], []
    for x, y in eval_batches(dataset, data, batch_size, device):
        feats.append(features_of(backbone, x, pool).float().cpu())
        labels.append(y)
    if backbone is not None:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


class _Marked(Dataset):
    """(image, label, readable) of a file dataset's items at ``indices``: an unreadable file gives a
    zero image marked unreadable, so every process keeps the same number of items."""

    def __init__(self, files: FileImages, indices: list[int], shape: tuple[int, int, int]) -> None:
        self.files, self.indices, self.shape = files, indices, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        if (item := self.files[self.indices[i]]) is None:
            return torch.zeros(self.shape), -1, False
        return item[0], int(item[1]), True


def to_host(x: torch.Tensor) -> torch.Tensor:
    """``x`` off the accelerator: a pinned host copy on CUDA (written without waiting; read it after
    :func:`host_ready`), ``x`` itself on the CPU."""
    if x.device.type != "cuda":
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def host_ready(device: torch.device) -> None:
    """Wait for the copies :func:`to_host` started on ``device``."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


Sink = Callable[[dict[str, torch.Tensor]], None]


@torch.no_grad()  # not inference mode: FSDP may gather parameters in here, which must stay ordinary tensors
def extract_distributed(backbone: torch.nn.Module | None, dataset: ImageArray | FileImages, data: DataConfig,
                        device: torch.device, outputs: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                        precision: str = "fp32", batch_size: int = 256, progress: bool = False,
                        half: tuple[str, ...] = (), sink: Sink | None = None) -> dict[str, torch.Tensor] | None:
    """``outputs(images)`` (a dict of (B, ...) tensors) over a whole split, each process computing
    every world-th image under autocast (``precision``), each batch gathered to the main process
    (not all-gathered) and there written into one host buffer per key (float32, float16 for the keys
    in ``half``). Main process: the dict in dataset order plus ``labels`` (N,) and ``index`` (N,); or,
    with ``sink``, ``sink(rows)`` per gathered batch and {}. None elsewhere. Every process runs the
    same number of forward passes (an FSDP forward is a collective); unreadable files are left out."""
    n, w, r = len(dataset), dist.world_size(), dist.rank()
    per = math.ceil(n / w)
    idx = torch.arange(r, r + w * per, w)
    inside = idx < n
    idx = idx.clamp(max=n - 1)
    was = backbone.training if backbone is not None else False
    if backbone is not None:
        backbone.eval()
    held: dict[str, torch.Tensor] = {}
    filled = 0
    if isinstance(dataset, ImageArray):
        batches: Any = ((x, y, torch.ones(len(y), dtype=torch.bool)) for x, y in
                        eval_batches(dataset, data, batch_size, device, indices=idx))
    else:
        dataset.transform = image_eval(data)
        shape = (data.channels, data.img_size, data.img_size)
        batches = DataLoader(_Marked(dataset, idx.tolist(), shape), batch_size=batch_size, num_workers=data.num_workers,
                             worker_init_fn=worker_ignores_stop)
    bar = tqdm(total=per, desc="features", unit="img", disable=not (progress and dist.is_main()), dynamic_ncols=True)
    done = 0
    for x, y, good in batches:
        b = len(y)
        with autocast(device, precision):
            out = {k: v.half() if k in half else v.float() for k, v in outputs(x.to(device, non_blocking=True)).items()}
        out["labels"] = torch.as_tensor(y).to(device)
        out["index"] = idx[done : done + b].to(device)
        out["keep"] = (torch.as_tensor(good) & inside[done : done + b]).to(device, torch.uint8)
        done += b
        parts = {k: dist.gather_to_main(v) for k, v in out.items()}  # per batch: nothing piles up on the device
        del out
        bar.update(b)
        if not dist.is_main():
            continue
        rows = {k: torch.cat(v) for k, v in parts.items() if v is not None}
        keep = rows.pop("keep").bool()
        order = rows["index"][keep].argsort()  # the processes' rows interleave: back to the dataset's order
        if sink is not None:  # pinned per batch (the host allocator reuses the blocks), handed on
            rows = {k: to_host(v[keep][order]) for k, v in rows.items()}
            host_ready(device)
            sink(rows)
            continue
        m = int(keep.sum())
        for k, v in rows.items():
            if k not in held:  # the whole split, once, in ordinary host memory: no pinned bank, no final copy
                held[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
            held[k][filled : filled + m].copy_(v[keep][order])
        filled += m
    bar.close()
    if backbone is not None:
        backbone.train(was)
    if not dist.is_main():
        return None
    return {k: v[:filled] for k, v in held.items()}


def extract_features_distributed(backbone: torch.nn.Module | None, dataset: ImageArray | FileImages,
                                 data: DataConfig, device: torch.device, precision: str = "fp32",
                                 batch_size: int = 256, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features (N, D) float32 on the CPU, labels (N,)) of a whole split on the main process, None
    elsewhere: :func:`extract_distributed` of :func:`features_of` (``backbone=None``: raw pixels).
    Alone it gives what :func:`extract_features` gives."""
    got = extract_distributed(backbone, dataset, data, device, lambda x: {"f": features_of(backbone, x, pool)},
                              precision, batch_size)
    return None if got is None else (got["f"], got["labels"])


def gather_host_rows(x: torch.Tensor, device: torch.device, chunk: int = 256) -> torch.Tensor | None:
    """Every process's host rows ``x`` (n_r, ...) (the n_r may differ) concatenated in rank order on
    the main process's host, None elsewhere: ``chunk`` rows at a time through ``device`` (where the
    backend takes them), each piece back off the accelerator at once. Alone: ``x``."""
    if not dist.is_dist():
        return x
    sizes = dist.gather_no_grad(torch.tensor([len(x)], device=device)).tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    for i in range(0, max(sizes), chunk):
        got = dist.gather_to_main(x[i : i + chunk].to(device))
        if got is not None:
            for r, g in enumerate(got):
                parts[r].append(to_host(g))
    if not dist.is_main():
        return None
    host_ready(device)
    return torch.cat([x[:0], *(p for rank in parts for p in rank)])
