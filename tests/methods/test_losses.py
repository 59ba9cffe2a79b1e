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


def _loop_patch_loss(pred, target, mask, t, negatives, threshold=1.0):
    """Reference: one cross-entropy per masked position, written as a loop; a negative whose
    teacher cosine to the positive's teacher token exceeds ``threshold`` is left out."""
    b, n, _ = target.shape
    losses = []
    for i in range(b):
        for j, pos in enumerate(mask[i].nonzero().flatten().tolist()):
            p = F.normalize(pred[i, j], dim=0)
            if negatives == "image":
                keys, label = target[i], pos
            elif negatives == "batch":
                keys, label = target.reshape(b * n, -1), i * n + pos
            elif negatives == "position":  # the same position in every image
                keys, label = target[:, pos], i
            else:  # image+position: the image's own tokens, then the other images' at this position
                keys, label = torch.cat([target[i], target[[c for c in range(b) if c != i], pos]]), pos
            keys = F.normalize(keys, dim=1)
            keep = [k for k in range(len(keys)) if k == label or float(keys[k] @ keys[label]) <= threshold]
            logits = keys[keep] @ p / t
            losses.append(-torch.log_softmax(logits, 0)[keep.index(label)])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["image", "batch", "position", "image+position"])
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


@pytest.mark.parametrize("negatives", ["image", "batch", "position", "image+position"])
def test_patch_loss_threshold_drops_exactly_the_near_duplicates(negatives):
    """At a threshold that drops some negatives and keeps others, equal to a loop that leaves out
    exactly those above it (and never the positive)."""
    torch.manual_seed(0)
    b, n, m, d = 3, 8, 4, 3  # 3 dimensions: many pairs above 0.5, many below
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n)[:m]] = True
    pred, target = torch.randn(b, m, d), torch.randn(b, n, d)
    t = F.normalize(target, dim=-1)
    cos = t @ t.transpose(1, 2)
    assert 0.1 < (cos > 0.5).float().mean() < 0.6  # the threshold really splits the negatives
    got = PatchContrastiveLoss(0.3, negatives, neg_threshold=0.5)(pred, target, mask)
    want = _loop_patch_loss(pred, target, mask, 0.3, negatives, threshold=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() != pytest.approx(_loop_patch_loss(pred, target, mask, 0.3, negatives).item(), rel=1e-3)


def test_regression_losses():
    a, b = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert regression_loss("l1", a, b).item() == pytest.approx(1.0)
    assert regression_loss("smooth_l1", a, b).item() == pytest.approx(0.5)
    assert regression_loss("cosine", a, a * 3).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        regression_loss("l3", a, b)


def _f64_patch_loss(pred, target, idx, t):
    """Same-image patch InfoNCE in fp64, vectorised (the reference for the precision test)."""
    p, k = F.normalize(pred.double(), dim=-1), F.normalize(target.double(), dim=-1)
    logits = p @ k.transpose(1, 2) / t
    return F.cross_entropy(logits.flatten(0, 1), idx.flatten())


def test_loss_bodies_run_in_fp32_under_bf16_autocast():
    """Under bf16 autocast a cosine moves in steps of ~0.004; hard negatives sit 0.002-0.05 from
    the positive. The loss bodies must ignore autocast: their value under it equals fp64 to fp32
    accuracy (bf16 logits are off by ~1e-2)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 1, 64, generator=g)
    target = base + 0.02 * torch.randn(4, 16, 64, generator=g)  # near-duplicate tokens: the hard case
    pred = (target[:, :8] + 0.01 * torch.randn(4, 8, 64, generator=g)).requires_grad_()
    idx = torch.arange(8).expand(4, 8)
    q, k = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patch = PatchContrastiveLoss(0.2)(pred, target, idx)
        image = info_nce(q, k, torch.arange(32), 0.2)
        reg = regression_loss("cosine", pred, target[:, :8])
    assert patch.dtype == image.dtype == reg.dtype == torch.float32
    assert abs(patch.item() - _f64_patch_loss(pred, target, idx, 0.2).item()) < 1e-4
    want = F.cross_entropy(F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).T / 0.2, torch.arange(32))
    assert abs(image.item() - want.item()) < 1e-5
    cos = F.cosine_similarity(pred.double(), target[:, :8].double(), dim=-1)
    assert abs(reg.item() - (1 - cos).mean().item()) < 1e-6


def _capped_loop(pred, target, idx, pick, threshold=None, t=0.3):
    """The capped path by a loop, one process: each masked token (``idx``) against its own teacher token
    and the drawn tokens ``pick`` of the flattened batch, less its own (and, with ``threshold``, those
    whose teacher cosine to it is above); (mean loss, negatives dropped in all)."""
    b, n, d = target.shape
    flat = F.normalize(target.reshape(b * n, d), dim=-1)
    losses, dropped = [], 0
    for i in range(b):
        for j in range(idx.shape[1]):
            own = i * n + int(idx[i, j])
            q = F.normalize(pred[i, j], dim=0)
            negs = [flat[c] for c in pick.tolist()
                    if c != own and (threshold is None or float(flat[own] @ flat[c]) <= threshold)]
            dropped += len(pick) - len(negs)
            logits = torch.stack([q @ flat[own], *[q @ v for v in negs]]) / t
            losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean(), dropped


def test_batch_negatives_capped_and_sampled():
    """``max_negatives`` below the pool: the logits are (B*M, K + 1) with the positive first, the
    negatives are K distinct tokens of the batch drawn with the torch RNG, and a drawn positive is
    masked out; at or above the pool nothing changes."""
    g = torch.Generator().manual_seed(1)
    b, n, m, d, k = 3, 8, 4, 16, 10
    target, pred = torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    full = PatchContrastiveLoss(0.3, "batch", gather=False)(pred, target, idx)
    assert PatchContrastiveLoss(0.3, "batch", gather=False, max_negatives=b * n)(pred, target, idx) == full
    torch.manual_seed(5)
    got = PatchContrastiveLoss(0.3, "batch", gather=False, max_negatives=k)(pred, target, idx)
    torch.manual_seed(5)
    want, _ = _capped_loop(pred, target, idx, torch.randperm(b * n)[:k])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() < full.item()  # fewer negatives: an easier task


def test_autocast_off_follows_the_first_tensor():
    from mimco.methods.losses import autocast_off

    for ctx in (autocast_off(), autocast_off(None, torch.zeros(1))):  # no tensor: the CPU
        assert isinstance(ctx, torch.autocast) and ctx.device == "cpu" and not ctx._enabled
    assert not isinstance(autocast_off(torch.zeros(1, device="meta")), torch.autocast)  # no autocast there
    with autocast_off(torch.zeros(1)), torch.autocast("cpu", dtype=torch.bfloat16):
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_off(torch.zeros(2, 2)):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_global_infonce_on_rank_one_of_two(monkeypatch):
    """With a (simulated) second process, the keys of the whole batch are scored and the positive
    of local query i is global key B + i; with gather off, only the local keys."""
    import mimco.methods.losses as losses

    torch.manual_seed(0)
    q, k, other = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1), torch.randn(3, 8)
    monkeypatch.setattr(losses, "gather_no_grad", lambda x: torch.cat([F.normalize(other, dim=-1), x]))
    monkeypatch.setattr(losses, "rank", lambda: 1)
    t = 0.3
    all_keys = torch.cat([F.normalize(other, dim=-1), k])
    want = F.cross_entropy(q @ all_keys.T / t, torch.arange(3) + 3) * 2 * t
    assert torch.allclose(GlobalInfoNCE(t)(q, k), want)
    local = F.cross_entropy(q @ k.T / t, torch.arange(3))
    assert torch.allclose(GlobalInfoNCE(t, gather=False)(q, k), local * 2 * t)
    assert torch.allclose(GlobalInfoNCE(t, gather=False, scale_by_2t=False)(q, k), local)


def test_patch_loss_defaults_and_bad_negatives():
    crit = PatchContrastiveLoss()
    default = GlobalInfoNCE()
    assert crit.temperature == default.temperature == 0.2 and default.gather and default.scale_by_2t
    assert crit.gather and crit.negatives == "image" and crit.neg_threshold == 1.0 and crit.max_negatives == 0
    with pytest.raises(ValueError, match="unknown patch negatives 'pixels'"):
        PatchContrastiveLoss(negatives="pixels")


@pytest.mark.parametrize("threshold", [0.2, 0.0])
def test_sampled_negatives_drop_near_duplicates_and_the_positive(threshold):
    """The capped path with a threshold, against a loop: a drawn token is dropped when it is the
    query's own positive or when its teacher cosine to the positive is above the threshold."""
    g = torch.Generator().manual_seed(2)
    b, n, m, d, k = 3, 8, 4, 16, 12
    target, pred = torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    torch.manual_seed(7)
    got = PatchContrastiveLoss(0.3, "batch", neg_threshold=threshold, gather=False, max_negatives=k)(pred, target, idx)
    torch.manual_seed(7)
    want, dropped = _capped_loop(pred, target, idx, torch.randperm(b * n)[:k], threshold)
    assert dropped > b * m  # the threshold dropped more than the drawn positives
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_capped_batch_negatives_gather_only_the_draw(monkeypatch):
    """On (simulated) rank 3 of 8, each process draws max_negatives // 8 of its own tokens and only
    the draw is gathered, with its global indices: the gather moves at most max_negatives tokens,
    not world x B x N, and the loss is the loop reference over the gathered set."""
    import mimco.methods.losses as losses

    world, me, b, n, m, d, cap = 8, 3, 3, 8, 4, 16, 20
    k = cap // world
    g = torch.Generator().manual_seed(4)
    target, pred = torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    others = {r: F.normalize(torch.randn(k, d, generator=g), dim=-1) for r in range(world)}
    gathered = []

    def gather(x):
        gathered.append(tuple(x.shape))
        parts = [x if r == me else (others[r] if x.is_floating_point() else torch.arange(k) + r * b * n)
                 for r in range(world)]
        return torch.cat(parts)

    monkeypatch.setattr(losses, "gather_no_grad", gather)
    monkeypatch.setattr(losses, "rank", lambda: me)
    monkeypatch.setattr(losses, "world_size", lambda: world)
    torch.manual_seed(9)
    got = PatchContrastiveLoss(0.3, "batch", max_negatives=cap)(pred, target, idx)
    assert gathered == [(k, d), (k,)]  # this process's draw and its indices, nothing else
    assert world * k <= cap
    torch.manual_seed(9)
    pick = torch.randperm(b * n)[:k]
    flat = F.normalize(target.reshape(b * n, d), dim=-1)
    bank = torch.cat([flat[pick] if r == me else others[r] for r in range(world)])
    ids = torch.cat([pick + me * b * n if r == me else torch.arange(k) + r * b * n for r in range(world)])
    losses_ = []
    for i in range(b):
        for j in range(m):
            own = me * b * n + i * n + int(idx[i, j])
            q = F.normalize(pred[i, j], dim=0)
            negs = [bank[c] for c in range(len(bank)) if int(ids[c]) != own]
            logits = torch.stack([q @ flat[i * n + int(idx[i, j])], *[q @ v for v in negs]]) / 0.3
            losses_.append(-torch.log_softmax(logits, 0)[0])
    assert got.item() == pytest.approx(torch.stack(losses_).mean().item(), rel=1e-5)
    gathered.clear()
    monkeypatch.setattr(losses, "gather_no_grad", lambda x: gathered.append(tuple(x.shape)) or x.repeat(world, 1))
    PatchContrastiveLoss(0.3, "batch", max_negatives=world * b * n)(pred, target, idx)  # no cap reached: every token
    assert gathered == [(b * n, d)]


@pytest.mark.parametrize("negatives", ["position", "image+position"])
def test_same_position_negatives_come_from_every_process(monkeypatch, negatives):
    """On (simulated) rank 1 of 2, the other process's images are negatives at each query's position
    and the positive is this process's own image (global index B + i): the loop over the gathered
    batch, scored from rank 1's queries alone."""
    import mimco.methods.losses as losses

    torch.manual_seed(3)
    b, n, m, d = 3, 8, 4, 6
    other, target, pred = torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(b, m, d)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n)[:m]] = True
    monkeypatch.setattr(losses, "gather_no_grad", lambda x: torch.cat([F.normalize(other, dim=-1), x]))
    monkeypatch.setattr(losses, "rank", lambda: 1)
    got = PatchContrastiveLoss(0.3, negatives)(pred, target, mask)
    every = torch.cat([other, target])
    want = []
    for i in range(b):
        for j, pos in enumerate(mask[i].nonzero().flatten().tolist()):
            if negatives == "position":
                keys, label = every[:, pos], b + i
            else:
                keys, label = torch.cat([target[i], every[[c for c in range(2 * b) if c != b + i], pos]]), pos
            logits = F.normalize(keys, dim=1) @ F.normalize(pred[i, j], dim=0) / 0.3
            want.append(-torch.log_softmax(logits, 0)[label])
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    local = PatchContrastiveLoss(0.3, negatives, gather=False)(pred, target, mask)
    assert local.item() != pytest.approx(got.item(), rel=1e-3)  # the other process's images counted
    # gather=False: this process's images alone (nothing gathered), its own image at index i
    assert local.item() == pytest.approx(_loop_patch_loss(pred, target, mask, 0.3, negatives).item(), rel=1e-5)


def _one_hot_tokens(b, n, d, g):
    """Teacher tokens that are each one of d axes: every cosine between two of them is exactly 0 or 1."""
    return F.one_hot(torch.randint(0, d, (b, n), generator=g), d).float() * (1 + torch.rand(b, n, 1, generator=g))


@pytest.mark.parametrize("negatives", ["image", "batch", "position", "image+position"])
def test_a_negative_exactly_at_the_threshold_is_kept(negatives):
    """Only cosines above neg_threshold are dropped: with one-hot teacher tokens (cosines exactly 0 or 1)
    and threshold 0, the orthogonal negatives stay and the duplicates go, as in the loop."""
    g = torch.Generator().manual_seed(3)
    b, n, m, d = 3, 8, 4, 3
    target, pred = _one_hot_tokens(b, n, d, g), torch.randn(b, m, d, generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[:m]] = True
    got = PatchContrastiveLoss(0.3, negatives, neg_threshold=0.0)(pred, target, mask)
    want = _loop_patch_loss(pred, target, mask, 0.3, negatives, threshold=0.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0.1  # negatives at 0 kept


def test_sampled_negatives_exactly_at_the_threshold_are_kept():
    g = torch.Generator().manual_seed(5)
    b, n, m, d, k = 3, 8, 4, 3, 12
    target, pred = _one_hot_tokens(b, n, d, g), torch.randn(b, m, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    torch.manual_seed(7)
    got = PatchContrastiveLoss(0.3, "batch", neg_threshold=0.0, gather=False, max_negatives=k)(pred, target, idx)
    torch.manual_seed(7)
    want, _ = _capped_loop(pred, target, idx, torch.randperm(b * n)[:k], threshold=0.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_capped_negatives_without_gather_ignore_the_rank(monkeypatch):
    """gather=False: the process's own tokens alone, indexed from 0 whatever its rank, so a drawn
    positive is still recognised and left out; with a cap below the number of processes each draws one."""
    import mimco.methods.losses as losses

    g = torch.Generator().manual_seed(6)
    b, n, m, d = 2, 4, 3, 8
    target, pred = torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    torch.manual_seed(1)
    at_rank_0 = PatchContrastiveLoss(0.3, "batch", gather=False, max_negatives=b * n - 1)(pred, target, idx)
    monkeypatch.setattr(losses, "rank", lambda: 3)
    monkeypatch.setattr(losses, "world_size", lambda: 8)
    torch.manual_seed(1)
    at_rank_3 = PatchContrastiveLoss(0.3, "batch", gather=False, max_negatives=b * n - 1)(pred, target, idx)
    assert at_rank_3.item() == at_rank_0.item()
    torch.manual_seed(1)
    want, _ = _capped_loop(pred, target, idx, torch.randperm(b * n)[: b * n - 1])  # most positives are drawn
    assert at_rank_3.item() == pytest.approx(want.item(), rel=1e-5)
    gathered = []
    monkeypatch.setattr(losses, "gather_no_grad", lambda x: gathered.append(tuple(x.shape)) or torch.cat([x] * 8))
    PatchContrastiveLoss(0.3, "batch", max_negatives=5)(pred, target, idx)  # 5 // 8 = 0: one each, not none
    assert gathered == [(1, d), (1,)]


@pytest.mark.parametrize("negatives", ["image", "batch", "position", "image+position"])
def test_losses_stay_on_the_device_of_their_inputs(negatives):
    """Every tensor a loss makes (labels, row indices, draws) is made on its inputs' device: on the
    meta device (a stand-in for a GPU here) a host tensor mixed in fails."""
    b, n, m, d = 2, 8, 3, 4
    pred, target = torch.randn(b, m, d, device="meta"), torch.randn(b, n, d, device="meta")
    idx = torch.zeros(b, m, dtype=torch.long, device="meta")
    for threshold in (1.0, 0.5):
        for cap in (0, 5):
            loss = PatchContrastiveLoss(0.3, negatives, threshold, gather=False, max_negatives=cap)(pred, target, idx)
            assert loss.device.type == "meta" and loss.shape == ()
    q, k = torch.randn(3, 4, device="meta"), torch.randn(3, 4, device="meta")
    assert GlobalInfoNCE(0.2, gather=False)(q, k).device.type == "meta"
