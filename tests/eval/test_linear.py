"""The linear probe's learning-rate grid: one pass for every setting, the choice made on held-out
training images, the single-lr probe unchanged, training on the features' device."""

import math

import pytest
import torch
from torch import nn

from mimco.errors import MimcoError
from mimco.eval.linear import (
    DEFAULT_LR_GRID,
    LinearHeads,
    held_out_split,
    linear_probe,
    train_heads,
)


def _reference_probe(ftr, ytr, fte, yte, epochs=30, batch_size=1024, lr=0.1, weight_decay=0.0, seed=0,
                     optimizer="sgd"):
    """The single-lr probe as it was before the grid (kept verbatim in behaviour): BN + Linear,
    one SGD / LARS group, cosine per step, batch order from ``seed``."""
    from timm.optim import Lars

    c = int(max(ytr.max(), yte.max())) + 1
    x = ftr.float()
    g = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], c))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    cls = torch.optim.SGD if optimizer == "sgd" else Lars
    opt = cls(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(ytr)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(head(x[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        pred = head(fte.float()).argmax(1)
    return float((pred == yte).float().mean() * 100)


def _clusters(n, seed, noise=1.0):
    """Four Gaussian clusters in 16 dimensions (the same centres for every seed), labels in turn."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % 4
    return centres[y] + noise * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), y


@pytest.mark.parametrize("opts", [{}, {"optimizer": "lars", "lr": 1.0}, {"lr": 0.03, "weight_decay": 1e-3, "seed": 5},
                                  {"lr": [0.1]}])
def test_single_lr_is_the_probe_it_was(opts):
    """One learning rate (a float, or a grid of one) gives exactly the previous implementation's
    accuracy: same init, same batch order, same optimiser."""
    x, y = _clusters(300, 0, noise=3.0)
    xt, yt = _clusters(200, 1, noise=3.0)
    got = linear_probe(x, y, xt, yt, epochs=4, batch_size=64, **opts)
    ref_opts = {**opts, "lr": opts.get("lr", 0.1)}
    ref_opts["lr"] = ref_opts["lr"][0] if isinstance(ref_opts["lr"], list) else ref_opts["lr"]
    want = _reference_probe(x, y, xt, yt, epochs=4, batch_size=64, **ref_opts)
    assert 40 < want < 100  # noisy enough that a changed recipe changes the number
    assert got == want and got.choice.held_out == 0 and got.lr == ref_opts["lr"]


def test_grid_picks_the_lr_best_on_held_out_data():
    """1e-7 cannot leave its random start in 3 epochs, 1e38 overflows to NaN: the grid keeps 0.1
    (in the middle, so neither "first" nor "last" would pass), and its result is the single-lr
    probe at 0.1 trained on the whole training split."""
    x, y = _clusters(400, 0)
    xt, yt = _clusters(200, 1)
    grid = [1e-7, 0.1, 1e38]
    top1 = linear_probe(x, y, xt, yt, epochs=3, batch_size=64, lr=grid)
    choice = top1.choice
    assert choice.held_out == 40 and choice.lr == 0.1
    scores = choice.scores
    assert scores[(0.1, 0.0)] > 95 and scores[(1e-7, 0.0)] < 60
    assert scores[(1e38, 0.0)] == 0  # not-a-number logits are wrong, whatever their argmax says
    assert top1 == linear_probe(x, y, xt, yt, epochs=3, batch_size=64, lr=0.1) > 95
    # weight decay is a second axis: 10.0 shrinks every weight to nothing, 0 does not
    choice = linear_probe(x, y, xt, yt, epochs=3, batch_size=64, lr=[0.1], weight_decay=[10.0, 0.0]).choice
    assert (choice.lr, choice.weight_decay) == (0.1, 0.0) and len(choice.scores) == 2


def test_grid_heads_are_the_single_runs_trained_together():
    """Head k of a grid ends where a run with setting k alone ends: the same batches, its own lr and
    weight decay (one parameter group each)."""
    x, y = _clusters(200, 0, noise=3.0)
    settings = [(0.01, 0.0), (0.5, 1e-3), (2.0, 0.0)]
    together = train_heads(lambda idx: x[idx], y, 16, 4, settings, epochs=2, batch_size=32, seed=3)
    for k, s in enumerate(settings):
        alone = train_heads(lambda idx: x[idx], y, 16, 4, [s], epochs=2, batch_size=32, seed=3)
        torch.testing.assert_close(together.linears[k].weight, alone.linears[0].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.linears[k].bias, alone.linears[0].bias, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(together.linears[0].weight, together.linears[2].weight)


def test_grid_is_one_pass(monkeypatch):
    """A grid of 10 draws as many batches as a grid of 2: one pass over the fit part (every head on
    each batch), the held-out part once, then the chosen setting once over the whole split."""
    calls: list[int] = []
    per_sample = LinearHeads.per_sample  # every forward pass of the heads goes through it

    def counted(self, x):
        calls.append(len(x))
        return per_sample(self, x)

    monkeypatch.setattr(LinearHeads, "per_sample", counted)
    x, y = _clusters(400, 0)
    xt, yt = _clusters(100, 1)
    epochs, bs = 3, 64
    counts = []
    for grid in (DEFAULT_LR_GRID, [0.05, 0.5]):
        calls.clear()
        linear_probe(x, y, xt, yt, epochs=epochs, batch_size=bs, lr=grid)
        counts.append((len(calls), sum(calls)))
    fit, held = 360, 40
    batches = epochs * math.ceil(fit / bs) + math.ceil(held / bs) + epochs * math.ceil(400 / bs) + 1
    assert counts[0] == counts[1] == (batches, epochs * fit + held + epochs * 400 + len(yt))
    calls.clear()
    linear_probe(x, y, xt, yt, epochs=epochs, batch_size=bs)  # one lr: one pass over the whole split
    assert len(calls) == epochs * math.ceil(400 / bs) + 1


def test_held_out_split_is_balanced_and_seeded():
    y = torch.cat([torch.zeros(50), torch.ones(30), torch.full((9,), 2)]).long()[torch.randperm(89)]
    fit, held = held_out_split(y, 0.1, seed=4)
    assert torch.equal(torch.sort(torch.cat([fit, held])).values, torch.arange(89))
    assert torch.bincount(y[held], minlength=3).tolist() == [5, 3, 0]  # a class of 9 keeps all its images
    assert torch.equal(held, held_out_split(y, 0.1, seed=4)[1])
    assert not torch.equal(held, held_out_split(y, 0.1, seed=5)[1])


def test_tiny_split_falls_back_and_says_so(capsys):
    """Too few images to hold out 10 % of a class (4 per class here): no choice is made; the
    lr nearest the single-lr default is trained, and one line says so."""
    x, y = _clusters(16, 0)
    xt, yt = _clusters(40, 1)
    top1 = linear_probe(x, y, xt, yt, epochs=2, batch_size=8, lr=[0.03, 1.0])
    choice = top1.choice
    assert (choice.lr, choice.held_out, choice.scores) == (0.03, 0, {})
    assert "too few" in capsys.readouterr().err and "0.03" in choice.note
    assert top1 == linear_probe(x, y, xt, yt, epochs=2, batch_size=8, lr=0.03)
    assert linear_probe(x, y, xt, yt, epochs=1, batch_size=8, lr=DEFAULT_LR_GRID).choice.lr == 0.1
    with pytest.raises(MimcoError, match="at least one learning rate"):
        linear_probe(x, y, xt, yt, lr=[])


def test_heads_train_on_the_features_device():
    """On the meta device (no values, but any copy to the host or a head left on the CPU fails), a
    grid's training pass keeps features, labels and heads where the features are."""
    x = torch.empty(100, 16, device="meta")
    y = torch.zeros(100, dtype=torch.long, device="meta")
    heads = train_heads(lambda idx: x[idx], y, 16, 4, [(0.1, 0.0), (1.0, 0.0)], epochs=2, batch_size=32)
    assert {p.device.type for p in heads.parameters()} == {"meta"}
    assert heads.norm.running_mean.device.type == "meta"
    with pytest.raises(RuntimeError):  # a head on the host cannot take meta features: the check has teeth
        LinearHeads(16, 4, 2)(x[:8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_grid_on_a_gpu_matches_the_cpu():
    x, y = _clusters(400, 0)
    xt, yt = _clusters(200, 1)
    grid = [1e-7, 0.1, 1e38]
    top1 = linear_probe(x.cuda(), y.cuda(), xt.cuda(), yt.cuda(), epochs=3, batch_size=64, lr=grid)
    assert top1.choice.lr == 0.1 and abs(top1 - linear_probe(x, y, xt, yt, epochs=3, batch_size=64, lr=grid)) < 1


def test_linprobe_default_is_the_grid():
    from mimco.cli.main import build_parser

    args = build_parser().parse_args(["linprobe", "pixels"])
    assert tuple(args.lr) == DEFAULT_LR_GRID
    assert build_parser().parse_args(["linprobe", "pixels", "--lr", "0.1", "1"]).lr == [0.1, 1.0]


def test_probe_results_average_like_floats():
    """The study averages probe results with ``statistics``, which rebuilds a value of the input's
    own type from a number: a Top1 must survive that (with no setting behind the mean)."""
    import json
    import pickle
    import statistics

    x, y = _clusters(120, 0, noise=3.0)
    runs = [linear_probe(x, y, x, y, epochs=1, batch_size=64, seed=s) for s in range(3)]
    mean = statistics.mean(runs)
    assert math.isclose(mean, sum(map(float, runs)) / 3) and mean.choice is None and mean.lr is None
    assert statistics.stdev(runs) >= 0
    assert json.loads(json.dumps(runs)) == [float(r) for r in runs]
    again = pickle.loads(pickle.dumps(runs[0]))
    assert again == runs[0] and again.choice == runs[0].choice
