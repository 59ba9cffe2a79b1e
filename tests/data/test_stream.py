"""One batch-stream builder for every stage: fine-tuning honours data.cache and data.on_device
(the same batches as its plain path), and every stage's stream comes from build_stream."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mimco.config import FinetuneConfig, load_config
from mimco.data.procedural import make_shapes
from mimco.data.stream import DeviceNormalize, TransformedArray, build_stream

CPU = torch.device("cpu")


def _folder(root, n=48, size=16):
    """A labelled folder of ``size``-px PNGs: decoded once at that size, they are the files' pixels."""
    images, labels = make_shapes(n, size, seed=0)
    for i, (x, y) in enumerate(zip(images, labels)):
        d = root / "train" / f"c{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.transpose(1, 2, 0)).save(d / f"{i:03d}.png")
    (root / "val").mkdir()
    (root / "val" / "c0").symlink_to(root / "train" / "c0")


def _batches(cfg, n=3):
    stream = build_stream(cfg, CPU, "labelled")
    it = stream(0)
    return stream, [next(it) for _ in range(n)]


FT = ["optim.batch_size=16", "data.num_workers=0", "data.img_size=16", "aug.mixup=0", "aug.cutmix=0"]


def test_finetune_with_data_cache_trains_on_the_same_batches(tmp_path):
    _folder(tmp_path / "imgs")
    base = [*FT, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}"]
    plain, a = _batches(load_config(FinetuneConfig, None, base))
    cached, b = _batches(load_config(FinetuneConfig, None, [*base, "data.cache=true"]))
    assert isinstance(cached.ds, TransformedArray) and not isinstance(plain.ds, TransformedArray)  # decoded once
    assert plain.num_classes == cached.num_classes == 6
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)


def test_finetune_with_data_on_device_trains_on_the_same_batches():
    """data.on_device: the loader hands over uint8 images, normalised (and randomly erased) on the
    device; without erasing, the batches are the plain path's to float rounding."""
    base = [*FT, "data.name=procedural", "data.procedural_size=64", "aug.reprob=0"]
    _, a = _batches(load_config(FinetuneConfig, None, base))
    moved, b = _batches(load_config(FinetuneConfig, None, [*base, "data.on_device=true"]))
    assert isinstance(moved.batch_transform, DeviceNormalize)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.dtype == torch.float32 and torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5)
    _, erased = _batches(load_config(FinetuneConfig, None, [*base, "data.on_device=true", "aug.reprob=1.0"]), n=1)
    x = erased[0][0]
    assert not torch.allclose(x, b[0][0]) and x.isfinite().all()  # every image erased somewhere


def test_device_normalize_matches_the_per_image_normalisation():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out, bad = DeviceNormalize(mean, std, 0.0, CPU)(x)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert bad == 0 and torch.allclose(out, want, atol=1e-5)


def test_view_kinds_are_registered_by_name(monkeypatch):
    """A method's ``views`` is a registered view kind: a new kind is one decorated builder (its batches
    from views_stream), an unknown one is refused when the method registers and when a stream is built."""
    import pytest

    import mimco.data.stream as stream
    from mimco.config import PretrainConfig
    from mimco.data.transforms import BatchMimView
    from mimco.errors import MimcoError
    from mimco.methods import register_method

    assert {"two", "one", "labelled", "masks"} <= set(stream.view_names())
    with pytest.raises(ValueError, match="views one of .* not 'teacher' / 'three'"):
        register_method("three-views", stage="teacher", views="three")(lambda cfg, device, **_: None)
    monkeypatch.setattr(stream, "_VIEWS", dict(stream._VIEWS))
    cfg = load_config(PretrainConfig, None, ["data.name=procedural", "data.procedural_size=64", "data.img_size=16",
                                              "optim.batch_size=8", "model.patch_size=4"])
    with pytest.raises(MimcoError, match="unknown view kind 'three'; registered: .*labelled, masks, .*one, two"):
        build_stream(cfg, CPU, "three")

    @stream.register_views("three")
    def three(cfg, device):  # the MIM view, three times
        one = lambda crop: BatchMimView(cfg.aug, cfg.data, crop=crop)  # noqa: E731
        return stream.views_stream(cfg, device, lambda crop: ThreeTimes(one(crop)), None)

    class ThreeTimes(torch.nn.Module):
        def __init__(self, view):
            super().__init__()
            self.view = view

        def forward(self, x):
            return [v for _ in range(3) for v in self.view(x)]

    views = next(build_stream(cfg, CPU, "three")(0))
    assert len(views) == 3 and all(v.shape == (8, 3, 16, 16) for v in views)
    with pytest.raises(MimcoError, match="views are made in batches only: data.name=folder needs data.cache=true"):
        build_stream(load_config(PretrainConfig, None, ["data.name=folder", "data.root=/nowhere"]), CPU, "three")
