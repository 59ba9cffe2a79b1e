"""Projection heads: MoCo v3's BN MLPs and MimCo's reconstruction heads."""

from __future__ import annotations

from torch import nn


def moco_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: [Linear(no bias), BN, ReLU] x (L-1), Linear(no bias), BN without affine.

    Layer indices match the released checkpoints (``head.0/1/3/4/6/7``, ``predictor.0/1/3/4``).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MimCo reconstruction head: Linear, GELU, Linear (student width -> teacher width)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
