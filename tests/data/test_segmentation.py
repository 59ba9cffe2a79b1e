"""Segmentation data: the Fashion-MNIST scenes, the three folder layouts, masks, joint augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimco.config import DataConfig, SegAugConfig, SegDataConfig
from mimco.data.fashion_mnist import load_fashion_mnist
from mimco.data.scenes import make_scenes, render_scenes, scene_layout
from mimco.data.segmentation import (
    IGNORE,
    SceneSplit,
    SegFolder,
    detect_layout,
    load_segmentation,
    seg_eval_transform,
    seg_train_transform,
)
from mimco.errors import MimcoError

# -- scenes ------------------------------------------------------------------------------------


def _expected(images, labels, placed, size, threshold):
    """The label and value of every pixel, read backwards: the last item drawn whose own pixel
    there is bright wins (an independent reading of 'drawn in order')."""
    canvas = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for y in range(size):
        for x in range(size):
            for src, top, left in reversed(placed):
                if top <= y < top + 28 and left <= x < left + 28 and images[src][y - top, x - left] > threshold:
                    canvas[y, x], mask[y, x] = images[src][y - top, x - left], labels[src] + 1
                    break
    return canvas, mask


def test_scene_labels_match_the_pasted_items():
    images, labels = load_fashion_mnist("", train=False)
    layout = scene_layout(6, len(images), 56, items=(2, 4), seed=3)
    canvas, masks = render_scenes(images, labels, layout, 56, 40)
    assert all(2 <= len(p) <= 4 for p in layout)
    for i, placed in enumerate(layout):
        want_canvas, want_mask = _expected(images, labels, placed, 56, 40)
        assert np.array_equal(canvas[i], want_canvas) and np.array_equal(masks[i], want_mask)
    assert set(np.unique(masks)) <= set(range(11)) and (masks == 0).any() and (masks > 0).any()


def test_scenes_are_deterministic_and_take_train_and_test_images_apart():
    data, seg = DataConfig(name="fmnist_scenes", img_size=56, channels=1), SegDataConfig(scenes=20, val_scenes=10)
    a, b = SceneSplit(data, seg, train=True), SceneSplit(data, seg, train=True)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    other = SceneSplit(data, SegDataConfig(scenes=20, scene_seed=1), train=True)
    assert not np.array_equal(a.images, other.images)
    for train, split in ((True, a), (False, SceneSplit(data, seg, train=False))):
        images, labels = load_fashion_mnist("", train=train)
        seed = 0 if train else 1
        n = len(split)
        layout = scene_layout(n, len(images), 56, seed=seed)
        canvas, masks = render_scenes(images, labels, layout, 56, seg.threshold)
        assert np.array_equal(canvas, split.images) and np.array_equal(masks, split.masks)  # drawn from that split
    assert len(a) == 20 and a.num_classes == 11


def test_scenes_as_pretraining_data_are_labelled_by_their_largest_item():
    """data.name=fmnist_scenes in a pre-training stage: one scene per Fashion-MNIST image of the split,
    laid out apart from the probe's scenes, each labelled with the class covering most of its pixels
    (counted here pixel by pixel), resized to data.img_size; data.subset caps the training split."""
    from mimco.data.build import load_dataset
    from mimco.data.scenes import PRETRAIN_SEED, pretraining_scenes

    images, labels = load_fashion_mnist("", train=False)
    canvases, dominant = pretraining_scenes(images[:50], labels[:50], train=False)
    layout = scene_layout(50, 50, 56, seed=PRETRAIN_SEED + 1)
    for i in range(50):
        _, mask = _expected(images[:50], labels[:50], layout[i], 56, 40)
        counts = [(mask == c + 1).sum() for c in range(10)]
        assert dominant[i] == int(np.argmax(counts))
    assert len(set(dominant.tolist())) > 3
    probe = SceneSplit(DataConfig(name="fmnist_scenes", img_size=56, channels=1), SegDataConfig(val_scenes=50),
                       train=False)
    assert not np.array_equal(probe.images, canvases)  # not the probe's validation scenes
    test = load_dataset(DataConfig(name="fmnist_scenes", img_size=28, channels=1), train=False)
    assert tuple(test.images.shape) == (10_000, 1, 28, 28) and test.labels.max() == 9
    train = load_dataset(DataConfig(name="fmnist_scenes", img_size=28, channels=3, subset=100), train=True)
    assert len(train) == 100 and train.batch(torch.arange(2)).shape == (2, 3, 28, 28)


def test_make_scenes_refuses_a_canvas_smaller_than_an_item():
    with pytest.raises(ValueError, match="cannot hold"):
        make_scenes(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64), 2, size=20)


# -- folders -----------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _rgb(h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def ade20k(root: Path) -> Path:
    for split in ("training", "validation"):
        for i in range(3):
            _png(root / "images" / split / f"ADE_{i}.jpg", _rgb())
            m = np.zeros((12, 16), np.uint8)
            m[:, 8:] = 150  # the last class
            m[:6, :] = 1
            _png(root / "annotations" / split / f"ADE_{i}.png", m)
    return root


def voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for name in ("a", "b", "c"):
        _png(base / "JPEGImages" / f"{name}.jpg", _rgb())
        m = np.full((12, 16), 15, np.uint8)
        m[0] = 255  # the border VOC leaves unlabelled
        img = Image.fromarray(m, "P")
        img.putpalette([v for i in range(256) for v in (i, 0, 0)])
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        img.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    return root


def plain(root: Path, classes: int = 3) -> Path:
    for split in ("train", "val"):
        for i in range(4):
            _png(root / split / "images" / f"{i}.png", _rgb())
            m = np.full((12, 16), i % classes, np.uint8)
            m[0, 0] = 7  # the folder's ignore value in tests that set seg.ignore_index=7
            _png(root / split / "masks" / f"{i}.png", m)
    return root


def test_each_layout_is_detected_and_its_masks_become_class_indices(tmp_path, capsys):
    a = SegFolder(str(ade20k(tmp_path / "ade")), True, SegDataConfig())
    assert (a.layout, a.num_classes, len(a)) == ("ade20k", 150, 3)
    image, mask = a.load(0)
    assert image.size == (16, 12) and mask[0, 0] == 0 and mask[11, 15] == 149 and mask[11, 0] == IGNORE
    v = SegFolder(str(voc(tmp_path / "voc")), False, SegDataConfig())
    assert (v.layout, v.num_classes, len(v)) == ("voc", 21, 1)
    _, mask = v.load(0)
    assert mask[0, 0] == IGNORE and mask[5, 5] == 15
    p = SegFolder(str(plain(tmp_path / "plain")), True, SegDataConfig(num_classes=3, ignore_index=7))
    assert (p.layout, p.num_classes, len(p)) == ("plain", 3, 4)
    _, mask = p.load(1)
    assert mask[0, 0] == IGNORE and mask[5, 5] == 1
    err = capsys.readouterr().err
    assert "ade20k layout, 3 training pairs, 150 classes" in err and "plain layout, 4 training pairs" in err


def test_a_folder_with_no_layout_names_the_three_and_what_it_found(tmp_path):
    (tmp_path / "pictures").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MimcoError) as e:
        detect_layout(tmp_path)
    msg = str(e.value)
    assert "ADE20K" in msg and "Pascal VOC" in msg and "plain" in msg and "found: notes.txt, pictures/" in msg
    assert "\n" not in msg


def test_plain_layout_needs_its_class_count(tmp_path):
    with pytest.raises(MimcoError, match="set seg.num_classes"):
        SegFolder(str(plain(tmp_path)), True, SegDataConfig())


def test_missing_unreadable_or_misfit_masks_are_left_out_and_a_label_too_high_names_its_file(tmp_path, capsys):
    root = plain(tmp_path, classes=3)
    (root / "train" / "masks" / "0.png").unlink()  # no mask: left out when listed
    (root / "train" / "masks" / "1.png").write_bytes(b"not a png")  # unreadable
    _png(root / "train" / "masks" / "2.png", np.zeros((5, 5), np.uint8))  # another size than its image
    ds = SegFolder(str(root), True, SegDataConfig(num_classes=3, ignore_index=7))
    assert "1 images without a mask left out" in capsys.readouterr().err and len(ds) == 3
    names = [Path(p).name for p, _ in ds.items]
    assert names == ["1.png", "2.png", "3.png"]
    assert ds[0] is None and ds[1] is None and ds[2] is not None
    _png(root / "train" / "masks" / "3.png", np.full((12, 16), 5, np.uint8))
    with pytest.raises(MimcoError, match=r"3\.png holds label 5, outside the 3 classes 0\.\.2"):
        ds.load(2)


def test_load_segmentation_refuses_data_without_masks():
    with pytest.raises(MimcoError, match="has no masks"):
        load_segmentation(DataConfig(name="fashion_mnist"), SegDataConfig(), True)


# -- joint augmentation ------------------------------------------------------------------------


def test_crop_and_flip_keep_each_mask_pixel_on_its_image_pixel():
    """An image whose grey level encodes the class of each pixel (8-px blocks of classes 0..48,
    no two neighbours alike): after the joint crop and flip, every pixel of the image away from a
    block edge still shows its mask's class."""
    g = np.random.default_rng(0)
    classes = g.permutation(49).reshape(7, 7)
    mask = np.kron(classes, np.ones((8, 8), np.int64)).astype(np.uint8)  # 56 x 56
    grey = (mask.astype(np.int64) * 5).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, -1))
    data = DataConfig(img_size=56, mean=[0, 0, 0], std=[1, 1, 1])  # crops are upsampled: no antialiasing blur
    t = seg_train_transform(SegAugConfig(min_scale=0.3, max_scale=1.0, flip_prob=0.5), data)
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        x, m = t(image, mask)
        assert x.shape == (3, 56, 56) and m.shape == (56, 56) and m.dtype == torch.int64
        level = torch.round(x[0] * 255 / 5).long()
        # away from block edges (the mask's 5 x 5 neighbourhood uniform) the bilinear image and the nearest mask agree
        pad = torch.nn.functional.pad(m[None, None].float(), (2, 2, 2, 2), mode="replicate")
        lo, hi = -torch.nn.functional.max_pool2d(-pad, 5, 1)[0, 0], torch.nn.functional.max_pool2d(pad, 5, 1)[0, 0]
        inside = lo == hi
        agree = (level == m)[inside].float().mean()
        assert inside.sum() > 100 and agree > 0.99, (seed, agree)
        torch.manual_seed(seed)
        x2, _ = t(image, mask)
        assert torch.equal(x, x2)
        first_col = m[:, 0]
        flipped += int((first_col == torch.from_numpy(mask)[0, -1]).any() and not (first_col == int(mask[0, 0])).any())
    assert flipped > 0  # some draws flipped the pair


def test_eval_transform_keeps_the_mask_at_its_own_size():
    image, mask = Image.fromarray(_rgb(30, 40)), np.ones((30, 40), np.uint8)
    x, m = seg_eval_transform(DataConfig(img_size=24))(image, mask)
    assert x.shape == (3, 24, 24) and m.shape == (30, 40)
