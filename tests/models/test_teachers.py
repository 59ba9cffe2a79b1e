"""The teacher's view: its input (channels, normalisation, resolution), the chosen features and the
resampling of its patch map, each against a reference written out by hand."""

import pytest
import timm
import torch
import torch.nn.functional as F

from mimco.config import ModelConfig
from mimco.errors import MimcoError
from mimco.models import MoCoMLP, create_vit
from mimco.models.teachers import TeacherView, resample_grid


def test_area_resampling_averages_the_covered_teacher_patches():
    t = torch.randn(2, 16, 5)  # a 4x4 grid
    out = resample_grid(t, (4, 4), (2, 2), "area")
    grid = t.reshape(2, 4, 4, 5)
    ref = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for i in range(2) for j in range(2)], 1)
    assert torch.allclose(out, ref, atol=1e-6)
    # 7x7 -> 4x4 (a patch-4 teacher under a patch-7 student at 28 px): window i covers rows floor(7i/4)..ceil(7(i+1)/4)
    t = torch.randn(1, 49, 3)
    out = resample_grid(t, (7, 7), (4, 4), "area")
    g = t.reshape(1, 7, 7, 3)
    span = lambda i: slice((7 * i) // 4, -(-(7 * (i + 1)) // 4))  # noqa: E731
    ref = torch.stack([g[:, span(i), span(j)].mean((1, 2)) for i in range(4) for j in range(4)], 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert resample_grid(t, (7, 7), (7, 7), "area") is t  # the same grid: untouched


def test_bilinear_resampling_keeps_a_linear_ramp():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ramp = (2 * rows + cols).reshape(1, 16, 1)
    up = resample_grid(ramp, (4, 4), (8, 8), "bilinear").reshape(8, 8)
    # the centre of fine cell (i, j) sits at coarse coordinate (i + 0.5) / 2 - 0.5: interior cells follow the ramp
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ref = 2 * ((r + 0.5) / 2 - 0.5) + ((c + 0.5) / 2 - 0.5)
    assert torch.allclose(up[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)
    assert torch.allclose(resample_grid(torch.full((1, 16, 2), 3.0), (4, 4), (3, 3), "bilinear"), torch.tensor(3.0))


def _teacher(depth: int = 3, img: int = 32, chans: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit(ModelConfig(patch_size=8, embed_dim=32, depth=depth, num_heads=2), img, chans).eval()


def test_input_is_renormalised_resized_and_given_three_channels():
    teacher = _teacher(img=24)
    view = TeacherView(teacher, 24, [0.5], [0.25], [0.4, 0.5, 0.6], [0.2, 0.3, 0.4], (2, 2))
    raw = torch.rand(2, 1, 16, 16)  # a grey image in [0, 1]
    got = view.inputs((raw - 0.5) / 0.25)  # as the student sees it
    rgb = raw.expand(-1, 3, -1, -1)
    ref = (F.interpolate(rgb, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
           - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    assert got.shape == (2, 3, 24, 24) and torch.allclose(got, ref, atol=1e-5)
    same = TeacherView(teacher, 24, [0.5] * 3, [0.2] * 3, [0.5] * 3, [0.2] * 3, (3, 3))
    x = torch.randn(2, 3, 24, 24)
    assert not same.renormalise and same.inputs(x) is x  # same statistics and size: the batch as it is


def test_layers_and_target_norm_against_block_hooks():
    teacher = _teacher(depth=3)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in teacher.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final = teacher.forward_features(x)
    for h in hooks:
        h.remove()
    ln = lambda t: (t - t.mean(-1,
                               keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)  # noqa: E731
    cases = [([], "none", final), ([], "layernorm", ln(final)), ([-1], "none", outs[2]),
             ([1, 2], "none", (outs[1] + outs[2]) / 2), ([-2, -1], "layernorm", (ln(outs[1]) + ln(outs[2])) / 2),
             ([0], "layernorm", ln(outs[0]))]
    for layers, norm, ref in cases:
        for target in ("cls", "mean"):
            view = TeacherView(teacher, 32, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, (4, 4), layers, norm, target)
            with torch.no_grad():
                patch, image = view(teacher, x)
            assert torch.allclose(patch, ref[:, 1:], atol=1e-5), (layers, norm)
            assert torch.allclose(image, ref[:, 0] if target == "cls" else ref[:, 1:].mean(1),
                                  atol=1e-5), (layers, norm, target)


def test_projector_target_and_prefix_tokens():
    teacher = _teacher()
    teacher.head = MoCoMLP(3, 32, 64, 16).eval()
    x = torch.randn(2, 3, 32, 32)
    view = TeacherView(teacher, 32, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, (4, 4), image_target="projector")
    early = TeacherView(teacher, 32, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, (4, 4), [0], image_target="projector")
    with torch.no_grad():
        want = teacher.head(teacher.forward_features(x)[:, 0])
        assert torch.allclose(view(teacher, x)[1], want, atol=1e-5)
        assert torch.allclose(early(teacher, x)[1], want,
                              atol=1e-5)  # patch targets from block 0, projector from the end
    # DeiT's distillation token and DINOv2's registers are prefix tokens: never patch targets
    for name, prefix in (("deit_tiny_distilled_patch16_224", 2), ("vit_small_patch14_reg4_dinov2", 5)):
        m = timm.create_model(name, pretrained=False, num_classes=0, img_size=28 if "14" in name else 32,
                              depth=1).eval()
        size = m.patch_embed.img_size[0]
        v = TeacherView(m, size, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, m.patch_embed.grid_size)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            patch, image = v(m, x)
            tokens = m.forward_features(x)
        assert v.prefix == prefix and torch.allclose(patch, tokens[:, prefix:], atol=1e-5)
        assert torch.allclose(image, tokens[:, 0], atol=1e-5)


def test_views_that_cannot_work_are_refused():
    teacher = _teacher()
    ok = dict(model=teacher, img_size=32, data_mean=[0.0] * 3, data_std=[1.0] * 3, mean=[0.0] * 3, std=[1.0] * 3,
              student_grid=(4, 4))
    with pytest.raises(MimcoError, match="coarser than the student's 8x8"):
        TeacherView(**{**ok, "student_grid": (8, 8)})
    TeacherView(**{**ok, "student_grid": (8, 8)}, resample="bilinear")  # interpolation may upsample
    with pytest.raises(MimcoError, match="needs a teacher with a projector"):
        TeacherView(**ok, image_target="projector")
    no_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1,
                               class_token=False, global_pool="avg")
    with pytest.raises(MimcoError, match="no class token; use teacher.image_target=mean"):
        TeacherView(**{**ok, "model": no_cls, "student_grid": (2, 2)})
    with pytest.raises(MimcoError, match="takes 3-channel images but the data has 2 channels"):
        TeacherView(**{**ok, "data_mean": [0.0] * 2, "data_std": [1.0] * 2})
