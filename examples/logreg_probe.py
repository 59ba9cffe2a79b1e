"""An evaluation protocol defined outside the package: L-BFGS logistic regression on frozen features
(the linear evaluation of CLIP and of DINOv2's ``logreg`` runs), in one file.

The training split's features (CLS token) are standardised with the training split's statistics, a
multinomial logistic regression with L2 penalty ``1 / logreg.c`` is fitted by scikit-learn's L-BFGS
(at most ``logreg.max_iter`` iterations), and top-1 is scored on the test split. mimco loads the
file as a plugin, and the protocol then runs wherever protocols run::

    mimco probe logreg runs/mimco/last.pt --plugin examples/logreg_probe.py logreg.c=0.5
    mimco probe knn,logreg runs/mimco/last.pt --plugin examples/logreg_probe.py
    mimco pretrain --plugin examples/logreg_probe.py "eval.protocols=[knn,logreg]" ...

Under torchrun every process extracts its share of the features and the main process fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mimco.config import setting
from mimco.eval.protocols import Probe, register_protocol


@dataclass
class LogRegConfig:
    """The ``logreg`` protocol's options (``logreg.KEY=VALUE`` on ``mimco probe``)."""

    c: float = setting(1.0, above=0, what="the inverse L2 regularisation strength")
    max_iter: int = setting(1000, min=1, what="the L-BFGS iteration limit")
    pool: Literal["cls", "mean"] = "cls"  # the CLS token | the mean of the patch tokens


def fit_and_score(train: tuple[Any, Any], test: tuple[Any, Any], c: float, max_iter: int, seed: int = 0) -> float:
    """Top-1 (%) on ``test`` of a logistic regression fitted on ``train``: (features (N, D), labels (N,))
    each, tensors or arrays; the features standardised with the training split's mean and std."""
    (xtr, ytr), (xte, yte) = [(np.asarray(x, dtype=np.float64), np.asarray(y)) for x, y in (train, test)]
    scale = StandardScaler().fit(xtr)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(scale.transform(xtr), ytr)
    return float((model.predict(scale.transform(xte)) == yte).mean() * 100)


@register_protocol("logreg", options=LogRegConfig)
def logreg(probe: Probe, opts: LogRegConfig) -> dict[str, float]:
    """Logistic regression top-1 of the frozen features (main process; {} on the others)."""
    got = probe.features(opts.pool)
    if got is None:
        return {}
    (ftr, ytr), (fte, yte) = got
    top1 = fit_and_score((ftr.numpy(), ytr.numpy()), (fte.numpy(), yte.numpy()), opts.c, opts.max_iter, probe.seed)
    return {"logreg_top1": round(top1, 2)}
