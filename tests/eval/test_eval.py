import torch

from mimco.eval import knn_accuracy, linear_probe


def separable(n: int, c: int = 4, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 5
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g) * 0.5, y


def test_knn_separable_and_shuffled():
    x, y = separable(600)
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=20) > 98
    shuffled = y[:400][torch.randperm(400)]
    assert knn_accuracy(x[:400], shuffled, x[400:], y[400:], k=20) < 45


def test_linear_probe_separable_and_shuffled():
    x, y = separable(600)
    assert linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=20, batch_size=128) > 98
    shuffled = y[:400][torch.randperm(400)]
    assert linear_probe(x[:400], shuffled, x[400:], y[400:], epochs=20, batch_size=128) < 45
