"""Helpers of the probes: which splits can be scored, the k-NN bank, the few-label protocol's
subsets and the spread of its scores (the protocols themselves: :mod:`mimco.eval.protocols`)."""

from __future__ import annotations

from typing import Any

import torch

from mimco.config import DataConfig, EvalConfig
from mimco.data.build import ImageArray
from mimco.data.subsets import labelled_subset, take
from mimco.eval.features import extract_features_distributed
from mimco.eval.knn import knn_accuracies
from mimco.eval.linear import linear_probe


def has_labels(train: Any, test: Any) -> bool:
    """Whether a (train, test) pair can be scored: a test split exists and the bank is labelled."""
    return test is not None and not (isinstance(train, ImageArray) and int(train.labels.min()) < 0)


def bank_split(train: Any, ev: EvalConfig) -> Any:
    """The k-NN bank: the training split cut to ``ev.max_train`` images: the first ones of an
    in-memory set (already in a random order), a fixed random sample (seed 0, kept in the
    folder's order) of an image folder, whose files come class by class."""
    if not ev.max_train or len(train) <= ev.max_train:
        return train
    if isinstance(train, ImageArray):
        return take(train, torch.arange(ev.max_train))
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: ev.max_train]
    return take(train, sample.sort().values)


def spread_metrics(values: dict[str, list[float]], prefix: str = "", digits: int | None = 2) -> dict[str, float]:
    """{prefix + name: mean, prefix + name + "_std": sample standard deviation (0 for one value)} of
    values over label subsets (or probe heads), rounded to ``digits`` (None: as computed)."""
    out: dict[str, float] = {}
    for key, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        for name, v in ((key, float(t.mean())), (f"{key}_std", float(t.std()) if len(vals) > 1 else 0.0)):
            out[prefix + name] = v if digits is None else round(v, digits)
    return out


def probe_few_labels(backbone: torch.nn.Module | None, train: Any, test_features: torch.Tensor | None,
                     test_labels: torch.Tensor | None, data: DataConfig, device: torch.device, per_class: int = 0,
                     fraction: float = 0.0, seeds: tuple[int, ...] = (0, 1, 2), ks: tuple[int, ...] = (10,),
                     temperature: float = 0.07, linear: dict[str, Any] | None = None, pool: str = "cls",
                     what: str = "--per-class") -> dict[str, list[float]]:
    """k-NN (each k) and, with ``linear`` (the probe's options), the linear probe trained on one
    balanced labelled subset per seed (:func:`mimco.data.subsets.balanced_subset`) and scored on
    the whole test split. Returns {"knn<k>_top1": [one value per seed], "linear_top1": [...]}.
    Under torchrun every process extracts its share of each subset (``test_features`` None but on
    the main process), the main process scores them; the others return {}."""
    out: dict[str, list[float]] = {}
    for seed in seeds:
        part = labelled_subset(train, per_class, fraction, seed, what)
        got = extract_features_distributed(backbone, part, data, device, batch_size=512, pool=pool)
        if got is None or test_features is None or test_labels is None:
            continue
        ftr, ytr = got
        if ks:
            for k, acc in knn_accuracies(ftr, ytr, test_features, test_labels, list(ks), temperature).items():
                out.setdefault(f"knn{k}_top1", []).append(acc)
        if linear is not None:
            opts = {**linear, "seed": linear.get("seed", 0) + seed}
            out.setdefault("linear_top1", []).append(linear_probe(ftr, ytr, test_features, test_labels, **opts))
    return out
