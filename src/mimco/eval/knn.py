"""Weighted k-NN classification on frozen features (DINO's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN with votes weighted by ``exp(sim / T)``.

    Args:
        train_feats (N, D), train_labels (N,), test_feats (M, D).
    Returns:
        predicted labels (M,).
    """
    c = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    preds = []
    for i in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[i : i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), c).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, k, temperature, c)
    return float((pred == test_labels).float().mean() * 100)
