"""Frozen features of a backbone (or raw pixels) over a whole split, in inference mode."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from mimco.config import DataConfig
from mimco.data.build import ImageArray
from mimco.data.files import FileImages, collate_skip_bad
from mimco.data.transforms import Normalize, image_eval


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
        loader = DataLoader(part, batch_size=batch_size, num_workers=data.num_workers, collate_fn=collate_skip_bad)
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
                     device: torch.device, batch_size: int = 512, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features (N, D) float32 on CPU, labels (N,)).

    ``backbone=None`` gives the normalised raw pixels, flattened (the honest floor).
    ``pool``: ``cls`` (CLS token after the final norm) or ``mean`` (mean of patch tokens).
    """
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
