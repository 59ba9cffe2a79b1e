import copy

import pytest
import torch

from mimco.config import ModelConfig
from mimco.methods.losses import info_nce
from mimco.methods.moco import MoCoV3, momentum_at
from mimco.models import create_vit


def tiny_moco() -> MoCoV3:
    vit = create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), img_size=8, in_chans=3)
    return MoCoV3(vit, proj_dim=16, mlp_dim=32, temperature=0.2, base_momentum=0.9)


def test_momentum_schedule_endpoints():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_momentum_update_is_ema():
    m = tiny_moco()
    with torch.no_grad():
        for p in m.base_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.momentum_encoder.parameters()]
    base = [p.clone() for p in m.base_encoder.parameters()]
    m.update_momentum_encoder(0.9)
    for old, b, new in zip(before, base, m.momentum_encoder.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * b, atol=1e-6)


def test_layout_matches_released_checkpoints():
    keys = tiny_moco().state_dict().keys()
    for k in ["base_encoder.head.0.weight", "base_encoder.head.1.weight", "base_encoder.head.3.weight",
              "base_encoder.head.7.running_mean", "momentum_encoder.head.6.weight", "predictor.0.weight",
              "predictor.4.running_var"]:
        assert k in keys
    assert "base_encoder.head.7.weight" not in keys  # the last BN has no affine


def test_symmetric_loss_and_no_grad_to_momentum_encoder():
    m = tiny_moco()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    m.total_steps = 10
    torch.manual_seed(0)
    loss, _ = m([x1, x2], step=10)  # momentum 1.0 at the end: the momentum encoder is unchanged by the update
    with torch.no_grad():
        q1, q2 = m.predictor(m.base_encoder(x1)), m.predictor(m.base_encoder(x2))
        k1, k2 = m.momentum_encoder(x1), m.momentum_encoder(x2)
    labels = torch.arange(4)
    expected = 0.4 * (info_nce(q1, k2, labels, 0.2) + info_nce(q2, k1, labels, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in m.momentum_encoder.parameters())
    assert m.base_encoder.blocks[0].attn.qkv.weight.grad is not None


def test_moco_v3_defaults_and_frozen_momentum_encoder():
    m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3), 16, 32)
    assert m.criterion.temperature == 0.2 and m.base_momentum == 0.99  # MoCo v3's ViT recipe
    assert m.predictor.num_layers == 2 and m.base_encoder.head.num_layers == 3
    assert not any(p.requires_grad for p in m.momentum_encoder.parameters())
    assert momentum_at(1, 1, 0.99) == pytest.approx(1.0) and momentum_at(0, 0, 0.99) == pytest.approx(0.99)


def test_moco_v3_head_sizes_default_to_the_papers():
    m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3))
    assert (m.base_encoder.head.hidden_dim, m.base_encoder.head.out_dim) == (4096, 256)
    assert (m.predictor.hidden_dim, m.predictor.out_dim) == (4096, 256)


def test_forward_writes_no_momentum_parameter():
    """The momentum encoder is only read in forward: under FSDP2 on a GPU its all-gather reads the
    shards while forward runs, so an EMA written there could race with it. Its parameters keep
    their version counter through a forward of the first and a later step."""
    m = tiny_moco()
    m.total_steps = 10
    x = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    versions = [p._version for p in m.momentum_encoder.parameters()]
    for step in (0, 0, 3):
        m(x, step)
    assert [p._version for p in m.momentum_encoder.parameters()] == versions


def test_after_step_applies_the_next_steps_momentum():
    """after_step(s) (s optimiser steps done; 0 before the first) moves the momentum encoder by the EMA
    with momentum_at(s), the momentum of the step whose keys come next, and logs stay as they were."""
    m = tiny_moco()
    m.total_steps = 10
    with torch.no_grad():
        for p in m.base_encoder.parameters():
            p.add_(0.5)
    x = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    for step in (0, 3):
        mom = momentum_at(step, 10, 0.9)
        before = [p.clone() for p in m.momentum_encoder.parameters()]
        base = [p.detach().clone() for p in m.base_encoder.parameters()]
        m.after_step(step)
        for old, b, new in zip(before, base, m.momentum_encoder.parameters()):
            assert torch.allclose(new, mom * old + (1 - mom) * b, atol=1e-6)
        _, logs = m(x, step)
        assert logs["momentum"] == pytest.approx(mom) and isinstance(logs["momentum"], float)  # no device copy
    seen = []
    m.update_momentum_encoder = lambda mom: seen.append(mom)
    m.after_step(10)  # after the last step no key forward follows: nothing to update
    assert seen == []


def _old_order_reference(model, batches, total, lr):
    """MoCo v3's own loop (main_moco.py): at the start of step t the momentum encoder takes the EMA with
    momentum_at(t), then the keys are computed; the loss written out here, not through forward."""
    model.total_steps = total
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for t, (x1, x2) in enumerate(batches):
        model.update_momentum_encoder(momentum_at(t, total, model.base_momentum))
        q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
        with torch.no_grad():
            k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
        loss = model.criterion(q1, k2) + model.criterion(q2, k1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _engine_order(model, batches, total, lr, resume_at=None):
    """The engine's order: after_step(0) before a fresh run's first step, forward, optimiser step,
    after_step(t + 1). ``resume_at``: the run is saved there and continued by a fresh copy that
    loads the state dict (no after_step at its start: the saved run made it)."""
    model.total_steps = total
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.after_step(0)
    for t, views in enumerate(batches):
        if t == resume_at:
            state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            model = tiny_moco()
            model.load_state_dict(state)
            model.total_steps = total
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
            opt.load_state_dict(opt_state)
        loss, _ = model(list(views), t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(t + 1)
    return model


@pytest.mark.parametrize("resume_at", [None, 2])
def test_update_after_the_step_equals_moco_v3s_update_before_the_keys(resume_at):
    """Bit for bit, the same parameters as MoCo v3's order over a whole 4-step schedule, from encoders
    that differ at the start (as after model.init_from), also with a resume after step 2."""
    torch.manual_seed(0)
    start = tiny_moco()
    with torch.no_grad():
        for p in start.momentum_encoder.parameters():
            p.mul_(0.5)
    batches = [(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)) for _ in range(4)]
    torch.manual_seed(1)
    ref = _old_order_reference(copy.deepcopy(start), batches, 4, 0.1).state_dict()
    torch.manual_seed(1)
    got = _engine_order(copy.deepcopy(start), batches, 4, 0.1, resume_at).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert not torch.equal(ref["momentum_encoder.blocks.0.attn.qkv.weight"],
                           start.state_dict()["momentum_encoder.blocks.0.attn.qkv.weight"])
