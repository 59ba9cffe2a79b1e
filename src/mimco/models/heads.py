"""Projection heads: MoCo v3's BN MLPs and MimCo's reconstruction heads. Each keeps its sizes
as attributes, so callers never read a width out of a weight's shape."""

from __future__ import annotations

import torch
from torch import nn


class MoCoMLP(nn.Sequential):
    """MoCo v3 MLP: [Linear(no bias), BN, ReLU] x (L-1), Linear(no bias), BN without affine.

    Layer indices match the released checkpoints (``head.0/1/3/4/6/7``, ``predictor.0/1/3/4``).
    (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> None:
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=False))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
        super().__init__(*layers)
        self.num_layers, self.in_dim, self.hidden_dim, self.out_dim = num_layers, in_dim, hidden_dim, out_dim

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> MoCoMLP:
        """The MLP whose released weights are ``state`` (keys ``0.weight`` ... ``{3(L-1)}.weight``), loaded."""
        linears = sorted((int(k.split(".")[0]), v) for k, v in state.items()
                         if k.endswith(".weight") and v.ndim == 2)
        (_, first), (last_i, last) = linears[0], linears[-1]
        head = cls(len(linears), first.shape[1], first.shape[0], last.shape[0],
                   last_bn=f"{last_i + 1}.running_mean" in state)
        head.load_state_dict(state)
        return head


class ReconstructionHead(nn.Sequential):
    """MimCo reconstruction head: Linear, GELU, Linear (student width -> teacher width).
    (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
