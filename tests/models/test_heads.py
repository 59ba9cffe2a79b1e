import pytest
import torch

from mimco.models import MoCoMLP, ReconstructionHead


@pytest.mark.parametrize("layers,last_bn", [(3, True), (2, True), (3, False)])
def test_moco_mlp_sizes_and_rebuild_from_weights(layers, last_bn):
    torch.manual_seed(0)
    head = MoCoMLP(layers, 24, 40, 12, last_bn=last_bn)
    assert (head.num_layers, head.in_dim, head.hidden_dim, head.out_dim) == (layers, 24, 40, 12)
    head.train()(torch.randn(8, 24))  # moves the BN running statistics off their start
    again = MoCoMLP.from_state_dict(head.state_dict())
    assert (again.num_layers, again.in_dim, again.hidden_dim, again.out_dim) == (layers, 24, 40, 12)
    x = torch.randn(5, 24)
    assert torch.equal(head.eval()(x), again.eval()(x))


def test_released_key_layout_is_kept():
    keys = set(MoCoMLP(3, 8, 16, 4).state_dict())
    assert {"0.weight", "1.weight", "1.running_mean", "3.weight", "4.bias", "6.weight", "7.running_var"} <= keys


def test_reconstruction_head_maps_student_to_teacher_width():
    head = ReconstructionHead(32, 64, 48)
    assert (head.in_dim, head.hidden_dim, head.out_dim) == (32, 64, 48)
    assert head(torch.randn(2, 5, 32)).shape == (2, 5, 48)
