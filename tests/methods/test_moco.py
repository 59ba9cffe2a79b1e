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


def test_forward_uses_the_scheduled_momentum_once_per_step():
    """forward(step) moves the momentum encoder by the EMA with m = momentum_at(step), once per step
    (a second micro-batch of the same step does not move it again)."""
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
        _, logs = m(x, step)
        assert logs["momentum"] == pytest.approx(mom) and isinstance(logs["momentum"], float)  # no device copy
        for old, b, new in zip(before, base, m.momentum_encoder.parameters()):
            assert torch.allclose(new, mom * old + (1 - mom) * b, atol=1e-6)
        after = [p.clone() for p in m.momentum_encoder.parameters()]
        m(x, step)  # the same step again: no second update
        assert all(torch.equal(a, p) for a, p in zip(after, m.momentum_encoder.parameters()))


def test_moco_v3_defaults_and_frozen_momentum_encoder():
    m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3), 16, 32)
    assert m.criterion.temperature == 0.2 and m.base_momentum == 0.99  # MoCo v3's ViT recipe
    assert m.predictor.num_layers == 2 and m.base_encoder.head.num_layers == 3
    assert not any(p.requires_grad for p in m.momentum_encoder.parameters())
    assert momentum_at(1, 1, 0.99) == pytest.approx(1.0) and momentum_at(0, 0, 0.99) == pytest.approx(0.99)


def test_momentum_update_once_per_step_from_step_zero():
    """The EMA runs at the first forward of every step (steps 0, 1, 2 ...), never twice in a step."""
    m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3), 16, 32)
    m.total_steps = 10
    seen = []
    m.update_momentum_encoder = lambda mom: seen.append(mom)
    x = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    for step in (0, 0, 1, 1, 2):
        m(x, step)
    assert seen == [pytest.approx(momentum_at(s, 10, 0.99)) for s in (0, 1, 2)]
    fresh = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3), 16, 32)
    fresh.total_steps, calls = 10, []
    fresh.update_momentum_encoder = lambda mom: calls.append(mom)
    fresh(x, 1)  # a run resumed at step 1 updates at its first step too
    assert calls == [pytest.approx(momentum_at(1, 10, 0.99))]


def test_moco_v3_head_sizes_default_to_the_papers():
    m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3))
    assert (m.base_encoder.head.hidden_dim, m.base_encoder.head.out_dim) == (4096, 256)
    assert (m.predictor.hidden_dim, m.predictor.out_dim) == (4096, 256)
