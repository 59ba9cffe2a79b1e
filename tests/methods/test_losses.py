import math

import pytest
import torch
import torch.nn.functional as F

from mimco.methods.losses import GlobalInfoNCE, PatchContrastiveLoss, info_nce, regression_loss


def test_info_nce_hand_computed():
    q = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # normalised inside
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cosines: q0.k0 = 1, q0.k1 = 1/sqrt2, q1.k0 = 0, q1.k1 = 1/sqrt2 ; T = 0.5
    s = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(s / 0.5)))
    l1 = -math.log(math.exp(s / 0.5) / (math.exp(0.0) + math.exp(s / 0.5)))
    got = info_nce(q, k, torch.tensor([0, 1]), 0.5)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_global_info_nce_scales_by_2t():
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    plain = info_nce(q, k, torch.arange(6), 0.2)
    assert GlobalInfoNCE(0.2)(q, k).item() == pytest.approx(plain.item() * 0.4, rel=1e-6)


def _loop_patch_loss(pred, target, mask, t, negatives):
    """Reference: one cross-entropy per masked position, written as a loop."""
    b, n, _ = target.shape
    losses = []
    for i in range(b):
        for j, pos in enumerate(mask[i].nonzero().flatten().tolist()):
            p = F.normalize(pred[i, j], dim=0)
            keys = target[i] if negatives == "image" else target.reshape(b * n, -1)
            label = pos if negatives == "image" else i * n + pos
            logits = F.normalize(keys, dim=1) @ p / t
            losses.append(-torch.log_softmax(logits, 0)[label])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_patch_loss_matches_loop(negatives):
    b, n, m, d = 3, 9, 4, 5
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n)[:m]] = True
    pred, target = torch.randn(b, m, d), torch.randn(b, n, d)
    got = PatchContrastiveLoss(0.3, negatives)(pred, target, mask)
    assert got.item() == pytest.approx(_loop_patch_loss(pred, target, mask, 0.3, negatives).item(), rel=1e-5)


def test_patch_loss_threshold_drops_near_duplicate_negatives():
    b, n, d = 2, 6, 4
    target = torch.randn(b, 1, d).expand(b, n, d).clone()  # every token identical: all negatives are false
    target[:, 0] = torch.randn(b, d)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, 1:4] = True
    pred = target[:, 1:4].clone()
    plain = PatchContrastiveLoss(0.2, "image")(pred, target, mask)
    dropped = PatchContrastiveLoss(0.2, "image", neg_threshold=0.99)(pred, target, mask)
    assert plain.item() > 1.0  # the duplicates make the right answer ambiguous
    assert dropped.item() < 0.1 * plain.item()


def test_regression_losses():
    a, b = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert regression_loss("l1", a, b).item() == pytest.approx(1.0)
    assert regression_loss("smooth_l1", a, b).item() == pytest.approx(0.5)
    assert regression_loss("cosine", a, a * 3).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        regression_loss("l3", a, b)
