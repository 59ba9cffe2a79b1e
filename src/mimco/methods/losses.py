"""Contrastive and regression losses, standalone and distributed-aware.

Every InfoNCE here L2-normalises both sides, divides cosine similarities by a temperature and
takes the cross-entropy with the positive's index. Every loss body runs in fp32 with autocast
off (:func:`fp32`): under bf16 autocast a cosine moves in steps of ~0.004, coarser than the gap
between a positive and a same-image hard negative.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from mimco.distributed import gather_no_grad, rank, world_size
from mimco.masking import gather_tokens, masked_indices

F_ = TypeVar("F_", bound=Callable[..., Any])


def autocast_off(*tensors: Any) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on the device of the first tensor given."""
    dev = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    return torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda", "xpu") else contextlib.nullcontext()


def fp32(fn: F_) -> F_:
    """Run ``fn`` with autocast off and its half-precision tensor arguments cast to fp32 (fp64 stays
    fp64; the original stays reachable as ``fn.__wrapped__``, for the precision benchmark)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
                     for a in args)
        with autocast_off(*args):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@fp32
def contrastive_logits(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """``normalize(q) @ normalize(k).T / T`` in fp32: query (M, D), keys (K, D) -> (M, K)."""
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T / temperature


@fp32
def info_nce(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain InfoNCE: ``CE(normalize(q) @ normalize(k).T / T, labels)``, in fp32: query (M, D), keys
    (K, D), labels (M,) each query's positive in ``keys``."""
    return F.cross_entropy(contrastive_logits(query, keys, temperature), labels)


class GlobalInfoNCE(nn.Module):
    """InfoNCE against the keys of the whole global batch, scaled by 2T (MoCo v3).

    Keys are gathered from every process without gradient; the positive for local query i
    is global key ``rank * B + i``. Used for MoCo v3 and for MimCo's image-level loss.
    """

    def __init__(self, temperature: float = 0.2, gather: bool = True, scale_by_2t: bool = True) -> None:
        super().__init__()
        self.temperature, self.gather, self.scale_by_2t = temperature, gather, scale_by_2t

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (B, D) with gradient, keys (B, D) targets -> scalar loss."""
        b = query.shape[0]
        labels = torch.arange(b, device=query.device) + (rank() * b if self.gather else 0)
        loss = info_nce(query, gather_no_grad(keys) if self.gather else keys, labels, self.temperature)
        return loss * (2.0 * self.temperature) if self.scale_by_2t else loss


class PatchContrastiveLoss(nn.Module):
    """Patch-level contrastive reconstruction over masked positions: each student prediction is pulled
    to the teacher token at its position and pushed from the ``negatives`` (``image`` | ``batch`` |
    ``position`` | ``image+position``, the key ``loss.patch_negatives``: docs/training.md). Negatives whose
    teacher cosine to the positive exceeds ``neg_threshold`` are dropped (false negatives); with ``batch``,
    at most ``max_negatives`` tokens of the global batch (0 = all, :meth:`_sampled`)."""

    def __init__(self, temperature: float = 0.2, negatives: str = "image", neg_threshold: float = 1.0,
                 gather: bool = True, max_negatives: int = 0) -> None:
        super().__init__()
        if negatives not in ("image", "batch", "position", "image+position"):
            raise ValueError(f"unknown patch negatives '{negatives}'")
        self.temperature, self.negatives, self.neg_threshold = temperature, negatives, neg_threshold
        self.gather, self.max_negatives = gather, max_negatives

    @fp32
    def forward(self, pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pred (B, M, D) at the masked positions, target (B, N, D) teacher tokens at every position,
        positions (B, M) grid indices (:func:`mimco.masking.masked_indices`) or a bool mask (B, N) with M
        True per row (predictions row-major) -> the mean over the B*M positions, in fp32."""
        b, n, _ = target.shape
        p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        pos_idx = masked_indices(positions, pred.shape[1]) if positions.dtype == torch.bool else positions
        threshold = self.neg_threshold < 1.0
        t_pos = gather_tokens(t, pos_idx) if threshold else None  # (B, M, D), only to find near-duplicates
        if self.negatives in ("position", "image+position"):
            return self._same_position(p, t, pos_idx, t_pos)
        if self.negatives == "image":
            keys, labels = t.transpose(1, 2), pos_idx  # (B, D, N); each query against its own image's tokens
        else:  # every teacher patch token of the global batch (gathered from all processes)
            world = world_size() if self.gather else 1
            first = rank() * b * n if self.gather else 0  # this process's block of the gathered keys
            labels = pos_idx + torch.arange(b, device=pos_idx.device)[:, None] * n + first
            if 0 < self.max_negatives < world * b * n:
                return self._sampled(p, gather_tokens(t, pos_idx), t.reshape(b * n, -1), labels, threshold, world)
            keys = (gather_no_grad(t.reshape(b * n, -1)) if self.gather else t.reshape(b * n, -1)).T  # (D, world*B*N)
        logits = p @ keys
        if threshold:
            drop = (t_pos @ keys) > self.neg_threshold
            drop.scatter_(2, labels.unsqueeze(-1), False)
            logits = logits.masked_fill(drop, float("-inf"))
        return F.cross_entropy((logits / self.temperature).flatten(0, 1), labels.flatten())

    def _same_position(self, p: torch.Tensor, t: torch.Tensor, pos_idx: torch.Tensor,
                       t_pos: torch.Tensor | None) -> torch.Tensor:
        """Negatives at the query's own grid position, from every image of the global batch.

        p (B, M, D) normalised predictions; t (B, N, D) normalised teacher tokens; pos_idx (B, M);
        t_pos (B, M, D) the positives, only with a ``neg_threshold``. The scores of every position
        against every image are one batched matmul per position, (N, B, D) x (N, D, world*B), of which
        the masked positions' rows are kept: N*B*world*B floats (and world*B*N*D gathered; docs/training.md)."""
        b, n, d = t.shape
        every = gather_no_grad(t) if self.gather else t  # (G, N, D), G = world*B
        first = rank() * b if self.gather else 0
        grid = p.new_zeros(b, n, d).scatter(1, pos_idx.unsqueeze(-1).expand(-1, -1, d), p)  # predictions in place
        keys = every.transpose(0, 1).transpose(1, 2)  # (N, D, G)
        scores = torch.bmm(grid.transpose(0, 1), keys)  # (N, B, G): position x local image x global image
        rows = torch.arange(b, device=p.device)[:, None].expand_as(pos_idx)
        logits = scores[pos_idx, rows]  # (B, M, G)
        own = rows + first  # each query's own image among the G
        drop = None
        if t_pos is not None:
            drop = torch.bmm(t.transpose(0, 1), keys)[pos_idx, rows] > self.neg_threshold  # (B, M, G): positive vs key
            drop.scatter_(2, own.unsqueeze(-1), False)
        if self.negatives == "position":
            logits = logits if drop is None else logits.masked_fill(drop, float("-inf"))
            return F.cross_entropy((logits / self.temperature).flatten(0, 1), own.flatten())
        # image+position: the image's own N tokens (the positive among them), then the other images' at the position
        same = p @ t.transpose(1, 2)  # (B, M, N)
        others = torch.ones_like(logits, dtype=torch.bool).scatter_(2, own.unsqueeze(-1), False)
        if drop is not None:
            near = (t_pos @ t.transpose(1, 2)) > self.neg_threshold
            near.scatter_(2, pos_idx.unsqueeze(-1), False)
            same = same.masked_fill(near, float("-inf"))
            others &= ~drop
        logits = torch.cat([same, logits.masked_fill(~others, float("-inf"))], dim=-1)
        return F.cross_entropy((logits / self.temperature).flatten(0, 1), pos_idx.flatten())

    def _sampled(self, p: torch.Tensor, t_pos: torch.Tensor, local: torch.Tensor, labels: torch.Tensor,
                 threshold: bool, world: int) -> torch.Tensor:
        """Batch negatives capped at ``max_negatives``: the positive's logit first, then the sampled
        tokens (the positive itself masked out where it was drawn). p, t_pos (B, M, D) normalised;
        local (B*N, D) this process's teacher tokens; labels (B, M) each positive's index among the
        global batch's tokens.

        Each process draws ``max_negatives // world`` of its own tokens and only the draw is gathered
        (with its global indices), so every process scores against the same set and the gather moves
        at most ``max_negatives`` tokens, not every token of the global batch."""
        k = max(self.max_negatives // world, 1)
        pick = torch.randperm(local.shape[0], device=local.device)[:k]  # (k,) local indices
        neg, ids = local[pick], pick  # (k, D), (k,) indices among the global batch's tokens
        if self.gather:
            neg, ids = gather_no_grad(neg), gather_no_grad(pick + rank() * local.shape[0])  # (world*k, D), (world*k,)
        drop = labels.unsqueeze(-1) == ids  # (B, M, K): the positive drawn as a negative
        if threshold:
            drop |= (t_pos @ neg.T) > self.neg_threshold
        logits = torch.cat([(p * t_pos).sum(-1, keepdim=True), (p @ neg.T).masked_fill(drop, float("-inf"))], dim=-1)
        return F.cross_entropy((logits / self.temperature).flatten(0, 1), labels.new_zeros(labels.numel()))


@fp32
def regression_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Feature regression for the ablation: ``l1`` | ``smooth_l1`` | ``cosine`` (1 - cos), mean over tokens (fp32)."""
    losses = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss,  # smooth_l1: beta 1
              "cosine": lambda pred, target: (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()}
    if kind not in losses:
        raise ValueError(f"unknown regression loss '{kind}'")
    return losses[kind](pred, target)
