import torch

from mimco.config import ModelConfig
from mimco.masking import MaskGenerator
from mimco.methods.simmim import SimMIM, patchify
from mimco.models import MaskedViT, create_vit


def test_patchify_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    assert torch.equal(p[0, 1].view(2, 2, 3).permute(2, 0, 1), x[0, :, 0:2, 2:4])  # second patch: top right


def test_simmim_loss_only_on_masked_pixels():
    torch.manual_seed(0)
    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3))
    m = SimMIM(student, MaskGenerator("random", 0.5, (4, 4), seed=0))
    x = torch.randn(2, 3, 16, 16)
    mask = m.mask_generator(2, 0)
    loss, _ = m([x], step=0)
    expected = ((m.decoder(student(x, mask)[:, 1:]) - patchify(x, 4)).abs().mean(-1)[mask]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert student.mask_token.grad.abs().sum() > 0
