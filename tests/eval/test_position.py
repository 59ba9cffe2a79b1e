"""The position probe: how much of the patch tokens is their grid position."""

from __future__ import annotations

import numpy as np
import torch

from mimco.eval.position import position_scores, position_share

CPU = torch.device("cpu")


def grids(n: int, position: float, content: float, seed: int, d: int = 16, side: int = 4) -> torch.Tensor:
    """(n, d, side, side): a fixed vector per grid position (the same for every image, like a
    position embedding) times ``position``, plus a random vector per token times ``content``."""
    fixed = torch.randn(d, side, side, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(n, d, side, side, generator=torch.Generator().manual_seed(seed))
    return position * fixed + content * noise


def test_tokens_that_are_their_position_score_high_and_tokens_of_content_score_chance():
    only_place = position_scores(grids(64, 1.0, 0.05, 1), grids(32, 1.0, 0.05, 2), CPU)
    assert only_place["position_acc"] == 100.0 and only_place["position_share"] > 99
    only_content = position_scores(grids(64, 0.0, 1.0, 1), grids(32, 0.0, 1.0, 2), CPU)
    assert only_content["position_chance"] == 6.25  # 16 positions
    assert only_content["position_acc"] < 15 and abs(only_content["position_share"]) < 5
    mixed = position_scores(grids(64, 1.0, 1.0, 1), grids(32, 1.0, 1.0, 2), CPU)
    assert only_content["position_acc"] < mixed["position_acc"] < only_place["position_acc"]
    assert 30 < mixed["position_share"] < 70  # equal variances: about half


def test_the_share_is_a_regression_on_the_position_as_scikit_learn_scores_it():
    """In sample (train = val), the share is the R^2 of a least-squares fit of the tokens on the
    one-hot position, variance-weighted over the feature dimensions."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    g = grids(40, 0.7, 1.0, 3, d=8, side=3)
    x = g.permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    onehot = np.tile(np.eye(9), (40, 1))
    fit = LinearRegression().fit(onehot, x)
    want = 100 * r2_score(x, fit.predict(onehot), multioutput="variance_weighted")
    assert abs(position_share(g, g) - want) < 1e-3
