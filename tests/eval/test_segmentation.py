"""Segmentation scoring, the head, patch features and the frozen probe."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from mimco.config import DataConfig
from mimco.data.segmentation import IGNORE, SegSplit
from mimco.errors import MimcoError
from mimco.eval.segmentation import (
    GlobalBatchNorm2d,
    SegHead,
    check_backbone,
    confusion_matrix,
    patch_grid,
    scores,
    segprobe,
)

# target / prediction of 8 pixels, one ignored (255)
TARGET = torch.tensor([0, 0, 1, 1, 2, IGNORE, 0, 1])
PRED = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])


def test_confusion_matrix_and_miou_by_hand():
    conf = confusion_matrix(PRED, TARGET, 3)
    # rows: true class, columns: predicted; the ignored pixel counts nowhere
    assert conf.tolist() == [[2, 1, 0], [1, 2, 0], [1, 0, 0]]
    s = scores(conf)
    # IoU 0 = 2 / (3 + 4 - 2), IoU 1 = 2 / (3 + 3 - 2), IoU 2 = 0 / 1
    assert s["miou"] == pytest.approx(100 * (2 / 5 + 2 / 4 + 0) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert s["macc"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert s["classes"] == 3


def test_a_class_absent_from_the_split_is_left_out_but_a_predicted_absent_class_counts():
    four = scores(confusion_matrix(PRED, TARGET, 4))  # class 3: neither labelled nor predicted
    assert four["miou"] == pytest.approx(100 * (2 / 5 + 2 / 4) / 3) and four["classes"] == 3
    pred = PRED.clone()
    pred[7] = 3  # a pixel of class 1 predicted as the absent class 3
    s = scores(confusion_matrix(pred, TARGET, 4))
    # column 0 loses the pixel: IoU 0 = 2 / (3 + 3 - 2), IoU 1 = 2 / (3 + 3 - 2), IoU 2 = 0, IoU 3 = 0 / (0 + 1 - 0)
    assert s["miou"] == pytest.approx(100 * (2 / 4 + 2 / 4 + 0 + 0) / 4) and s["classes"] == 4


def test_confusion_matrix_of_2d_masks_equals_sklearn():
    from sklearn.metrics import confusion_matrix as sk

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (3, 9, 9), generator=g)
    t[0, :2] = IGNORE
    p = torch.randint(0, 5, (3, 9, 9), generator=g)
    keep = t != IGNORE
    want = sk(t[keep].numpy(), p[keep].numpy(), labels=list(range(5)))
    assert np.array_equal(confusion_matrix(p, t, 5).numpy(), want)


def test_global_batchnorm_alone_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3, 3)
    a, b = GlobalBatchNorm2d(6), torch.nn.BatchNorm2d(6)
    assert torch.allclose(a(x), b(x)) and torch.allclose(a.running_var, b.running_var)


def test_head_is_batchnorm_then_a_1x1_convolution():
    head = SegHead(8, 3)
    out = head(torch.randn(2, 8, 4, 5))
    assert out.shape == (2, 3, 4, 5)
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.conv.kernel_size == (1, 1)


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=0)


def test_patch_grid_is_the_last_blocks_patch_tokens_after_the_final_norm():
    m = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    outs = []
    for blk in m.blocks:  # by hand: every block's output, the final norm, CLS dropped, on the 4 x 4 grid
        h = blk(h)
        outs.append(m.norm(h)[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))
    assert torch.allclose(patch_grid(m, x, 1), outs[-1], atol=1e-6)
    assert torch.allclose(patch_grid(m, x, 2), torch.cat(outs[-2:], 1), atol=1e-6)
    pixels = patch_grid(None, x, patch=4)
    assert pixels.shape == (2, 48, 4, 4) and torch.equal(pixels[0, :, 1, 2], x[0, :, 4:8, 8:12].reshape(-1))


def test_backbones_without_patch_tokens_and_too_many_layers_are_refused():
    with pytest.raises(MimcoError, match="ResNet, which has no patch tokens"):
        check_backbone(timm.create_model("resnet18", pretrained=False), 1)
    with pytest.raises(MimcoError, match=r"--layers 4 is out of range: the checkpoint has 3 blocks; give 1\.\.3"):
        check_backbone(_vit(), 4)
    check_backbone(_vit(), 3)


class Stripes(SegSplit):
    """Images whose left half is class 1 and right half class 2 (the colour says which), with a
    few ignored pixels: a linear head on raw pixels learns it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.num_classes, self.names = n, seed, 3, []

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        g = np.random.default_rng(self.seed * 1000 + i)
        cut = int(g.integers(1, 4)) * 4
        img = np.zeros((16, 16, 3), np.uint8)
        img[:, :cut] = (200, 20, 20)
        img[:, cut:] = (20, 20, 200)
        mask = np.full((16, 16), 2, np.uint8)
        mask[:, :cut] = 1
        mask[0, 0] = IGNORE
        return Image.fromarray(img), mask


@pytest.mark.parametrize("cache", [True, False])
def test_the_probe_learns_a_separable_split_on_both_paths(cache):
    data = DataConfig(img_size=16, num_workers=0)
    values, heads = segprobe(None, Stripes(64, 0), Stripes(16, 1), data, torch.device("cpu"), patch=4, epochs=15,
                             batch_size=16, lr=1e-2, seeds=(0, 1), cache=cache)
    assert len(values["miou"]) == 2 and values["path"] == ("cached" if cache else "streamed")
    assert min(values["miou"]) > 95 and min(values["pixel_acc"]) > 97
    assert len(heads) == 2 and not torch.equal(heads[0].conv.weight, heads[1].conv.weight)


def test_the_probe_reports_token_position_and_measures_it_alone_without_heads():
    """The position probe on the extracted grids; no seeds: the position figures alone (the study
    adds them to a cached probe so)."""
    data = DataConfig(img_size=16, num_workers=0)
    values, heads = segprobe(None, Stripes(64, 0), Stripes(16, 1), data, torch.device("cpu"), patch=4, seeds=())
    assert heads == [] and "miou" not in values and values["path"] == "cached"
    assert values["position_chance"] == 6.25 and 0 <= values["position_acc"] <= 100 and values["position_share"] <= 100
    streamed, _ = segprobe(None, Stripes(64, 0), Stripes(16, 1), data, torch.device("cpu"), patch=4, epochs=1,
                           batch_size=16, cache=False)
    assert "position_acc" not in streamed


@pytest.mark.parametrize("size", [(56, 56), (30, 41), (5, 7), (8, 8)])
def test_upsampling_as_matrix_products_equals_bilinear_interpolation(size):
    from mimco.eval.segmentation import upsampled

    x = torch.randn(3, 5, 8, 8, requires_grad=True)
    want = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = upsampled(x, size)
    assert torch.allclose(got, want, atol=1e-6)
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(want, x, g)
    (gy,) = torch.autograd.grad(got, x, g)
    assert torch.allclose(gx, gy, atol=1e-5)
