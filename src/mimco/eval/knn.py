"""Weighted k-NN classification on frozen features (DINO's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def knn_predict_multi(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      ks: list[int], temperature: float = 0.07, num_classes: int | None = None,
                      chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Cosine k-NN for several k at once, votes weighted by ``exp(sim / T)``: train_feats (N, D),
    train_labels (N,), test_feats (M, D) -> {k: predicted labels (M,)}, neighbours searched once."""
    c = num_classes or int(train_labels.max()) + 1
    kmax = min(max(ks), len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)  # on the bank's device (a GPU at the end of a run)
    bank_labels = train_labels.to(bank.device)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for i in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[i : i + chunk].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # sorted, nearest first
        weights, labels = (sim / temperature).exp(), bank_labels[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(q), c, device=bank.device).scatter_add_(1, labels[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v).cpu() for k, v in preds.items()}


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Predicted labels (M,) for one k."""
    return knn_predict_multi(train_feats, train_labels, test_feats, [k], temperature, num_classes)[k]


def knn_accuracies(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   test_labels: torch.Tensor, ks: list[int], temperature: float = 0.07) -> dict[int, float]:
    """{k: top-1 accuracy in percent}."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict_multi(train_feats, train_labels, test_feats, ks, temperature, c)
    return {k: float((p == test_labels.cpu()).float().mean() * 100) for k, p in preds.items()}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent for one k."""
    return knn_accuracies(train_feats, train_labels, test_feats, test_labels, [k], temperature)[k]
