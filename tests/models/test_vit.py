import pytest
import torch

from mimco.config import ModelConfig, PretrainConfig, load_config
from mimco.errors import MimcoError
from mimco.models import MaskedViT, create_vit, sincos_pos_embed


def test_presets_and_heads():
    vit = create_vit(ModelConfig(arch="vit_small", num_heads=12), 32, 3)
    assert vit.embed_dim == 384 and len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12
    assert create_vit(ModelConfig(arch="vit_small"), 32, 3).blocks[0].attn.num_heads == 6
    # a shape no ViT can take fails when the config is built, before any model
    with pytest.raises(MimcoError, match="model.embed_dim=100 is not divisible by model.num_heads=3"):
        load_config(PretrainConfig, None, ["model.embed_dim=100", "model.num_heads=3"])
    with pytest.raises(MimcoError,
                       match="unknown model.arch 'vit_huge_x'; choose vit_mini, vit_tiny, vit_small or vit_base"):
        load_config(PretrainConfig, None, ["model.arch=vit_huge_x"])


def test_sincos_table_layout():
    t = sincos_pos_embed((3, 4), 16)[0]
    assert t.shape == (13, 16) and torch.all(t[0] == 0)
    rows = t[1:].view(3, 4, 16)
    # first half depends on the row only, second half on the column only
    assert torch.allclose(rows[:, :1, :8].expand(3, 4, 8), rows[:, :, :8])
    assert torch.allclose(rows[:1, :, 8:].expand(3, 4, 8), rows[:, :, 8:])
    assert torch.allclose(rows[0, 0, :4], torch.zeros(4)) and torch.allclose(rows[0, 0, 4:8], torch.ones(4))


def test_sincos_fixed_and_frozen_patch_embed():
    vit = create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed="sincos",
                                 freeze_patch_embed=True), 16, 3)
    assert not vit.pos_embed.requires_grad and not vit.patch_embed.proj.weight.requires_grad
    assert torch.equal(vit.pos_embed.data, sincos_pos_embed((4, 4), 32))


def test_masked_patches_do_not_see_their_pixels():
    torch.manual_seed(0)
    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 0] = True  # top-left 4x4 patch
    y = x.clone()
    y[..., :4, :4] = torch.randn(3, 4, 4)
    assert torch.allclose(student(x, mask), student(y, mask), atol=1e-6)
    assert not torch.allclose(student(x), student(y), atol=1e-4)


def test_student_backbone_is_plain_timm():
    import timm

    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16, 3))
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                            depth=2, num_heads=2, num_classes=0)
    ref.load_state_dict(student.backbone.state_dict())
    x = torch.randn(2, 3, 16, 16)
    student.eval(), ref.eval()
    assert torch.allclose(student(x)[:, 0], ref(x), atol=1e-6)


def test_mocov3_init_matches_the_official_bounds():
    """MoCo v3's vits.py: xavier-uniform Linear layers with zero bias, q/k/v initialised as three
    D x D matrices, the patch projection xavier-uniform over (C x p x p) -> D with zero bias, CLS
    normal(1e-6). Checked against those bounds (uniform samples fill their range)."""
    import math

    from mimco.config import ModelConfig
    from mimco.models.vit import create_vit

    torch.manual_seed(0)
    d, c, p = 64, 3, 4
    vit = create_vit(ModelConfig(patch_size=p, embed_dim=d, depth=2, num_heads=2, init="mocov3"), 16, c)
    qkv, fc1 = vit.blocks[0].attn.qkv.weight, vit.blocks[0].mlp.fc1.weight
    for w, bound in ((qkv, math.sqrt(6 / (d + d))), (fc1, math.sqrt(6 / (d + 4 * d))),
                     (vit.patch_embed.proj.weight, math.sqrt(6 / (c * p * p + d)))):
        assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(-a, a) has std a / sqrt(3)
    assert vit.blocks[0].attn.qkv.bias.abs().max() == 0 and vit.patch_embed.proj.bias.abs().max() == 0
    assert vit.cls_token.abs().max() < 1e-5
    timm_init = create_vit(ModelConfig(patch_size=p, embed_dim=d, depth=2, num_heads=2), 16, c)
    assert timm_init.blocks[0].attn.qkv.weight.std() < 0.025  # timm: trunc-normal 0.02


def test_stage_one_defaults_to_mocov3_init():
    from mimco.config import PretrainConfig, TeacherStageConfig

    assert TeacherStageConfig().model.init == "mocov3" and PretrainConfig().model.init == "timm"


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 1, "no_embed_class": True}])
def test_encode_matches_timm_forward_features(kw):
    """``encode`` reaches into timm's ``_pos_embed``; compare it with timm's public forward, masked
    patches replaced through a forward hook on the patch embedding (an independent route)."""
    from timm.models.vision_transformer import VisionTransformer

    from mimco.models import encode

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, **kw).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(encode(vit, x), vit.forward_features(x), atol=1e-6)
    mask = torch.rand(2, 16) < 0.5
    token = torch.randn(1, 1, 32)
    hook = vit.patch_embed.register_forward_hook(lambda _m, _i, out: torch.where(mask[..., None], token, out))
    try:
        want = vit.forward_features(x)
    finally:
        hook.remove()
    assert torch.allclose(encode(vit, x, mask, token), want, atol=1e-6)


def test_sincos_table_against_the_formula_at_every_position():
    """Every entry against MoCo v3's formula: quarter 1 sin(row * w_d), 2 cos(row * w_d), 3 sin(col * w_d),
    4 cos(col * w_d), w_d = 1 / 10000^(d / (dim/4)); rows run slowest in the flattened grid."""
    import math

    h, w, dim = 3, 5, 24
    t = sincos_pos_embed((h, w), dim)[0, 1:]
    q = dim // 4
    for pos in range(h * w):
        r, c = divmod(pos, w)
        for d in range(q):
            wd = 1.0 / 10000 ** (d / q)
            want = [math.sin(r * wd), math.cos(r * wd), math.sin(c * wd), math.cos(c * wd)]
            got = [t[pos, k * q + d].item() for k in range(4)]
            assert got == pytest.approx(want, abs=1e-5), (pos, d)
