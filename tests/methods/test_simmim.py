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


def test_masked_student_follows_the_config():
    """The student of the model section on the data's size, and the masks of the mask section, the
    unit in patches and the seed of the run."""
    from mimco.config import PretrainConfig, load_config
    from mimco.methods.simmim import masked_student

    cfg = load_config(PretrainConfig, None, ["method=simmim", "data.img_size=32", "data.channels=1",
                                             "model.patch_size=4", "model.embed_dim=32", "model.depth=1",
                                             "model.num_heads=2", "mask.type=random", "mask.ratio=0.5",
                                             "mask.mask_patch_size=8", "train.seed=5"])
    student, gen = masked_student(cfg)
    assert isinstance(student, MaskedViT) and student.backbone.patch_embed.proj.in_channels == 1
    assert tuple(student.backbone.patch_embed.grid_size) == (8, 8) and student.backbone.embed_dim == 32
    assert (gen.kind, gen.ratio, gen.grid_size, gen.mask_unit, gen.seed) == ("random", 0.5, (8, 8), 2, 5)


def test_simmim_forward_stays_on_the_device_of_the_batch():
    m = SimMIM(MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3)),
               MaskGenerator("random", 0.5, (4, 4), seed=0)).to("meta")
    loss, _ = m([torch.randn(2, 3, 16, 16, device="meta")], step=0, first_index=0)
    assert loss.device.type == "meta"
