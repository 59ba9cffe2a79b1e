import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimco.config import ContrastiveAugConfig, DataConfig, MimAugConfig, PretrainConfig, load_config
from mimco.data import BatchStream, load_dataset, make_shapes
from mimco.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from mimco.data.files import BadImageCounter, FileImages, Substituting
from mimco.data.transforms import BatchMimView, BatchTwoViews, image_two_views
from mimco.errors import MimcoError


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fmnist(root: Path, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_fashion_mnist_reader_and_channels(tmp_path):
    fake_fmnist(tmp_path)
    x, y = load_fashion_mnist(str(tmp_path), train=True)
    assert x.shape == (40, 28, 28) and y.shape == (40,) and y.dtype == np.int64
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), img_size=32, channels=3))
    batch = ds.batch(torch.arange(4))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 2])  # grey repeated to 3 channels


def test_fashion_mnist_missing_and_truncated(tmp_path):
    with pytest.raises(MimcoError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path), download=False)
    fake_fmnist(tmp_path)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(MimcoError, match="truncated"):
        load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_download_fallback(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        fake_fmnist(raw, n=5)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    x, _ = load_fashion_mnist(str(tmp_path), train=False)
    assert calls == [(str(tmp_path), False, True)] and x.shape == (5, 28, 28)

    def offline(root, train, download):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(MimcoError, match="download into .* failed.*apt-get install"):
        load_fashion_mnist(str(tmp_path / "other"))


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_location():
    x, y = load_fashion_mnist(train=False)
    assert x.shape == (10000, 28, 28) and sorted(np.unique(y).tolist()) == list(range(10))


def test_procedural_deterministic_and_labelled():
    a, la = make_shapes(64, 16, seed=0)
    b, lb = make_shapes(64, 16, seed=0)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and a.shape == (64, 3, 16, 16)
    assert set(la.tolist()) == set(range(6))
    assert not np.array_equal(a, make_shapes(64, 16, seed=1)[0])


def test_unknown_dataset():
    with pytest.raises(MimcoError, match="unknown data.name 'imagenet'; choose imagefolder, folder, fashion_mnist"):
        load_config(PretrainConfig, None, ["data.name=imagenet"])


def _save_images(folder: Path, n: int, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((np.random.rand(20, 24, 3) * 255).astype(np.uint8)).convert(mode).save(folder / f"{i}.png")


def test_image_folder_labels_and_modes(tmp_path):
    _save_images(tmp_path / "cat", 3)
    _save_images(tmp_path / "dog", 2, mode="L")
    _save_images(tmp_path / "dog", 1, mode="RGBA")
    ds = FileImages(str(tmp_path), labelled=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5  # 2 dog files overwritten by the RGBA pass
    img, label = ds[4]
    assert img.mode == "RGB" and label == 1


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(MimcoError, match="is not a folder"):
        FileImages(str(tmp_path / "nope"), labelled=False)
    with pytest.raises(MimcoError, match="no class sub-folders"):
        FileImages(str(tmp_path), labelled=True)
    (tmp_path / "a").mkdir()
    with pytest.raises(MimcoError, match="no images"):
        FileImages(str(tmp_path), labelled=True)


def test_corrupt_images_are_skipped_counted_and_capped(tmp_path):
    _save_images(tmp_path / "x", 6)
    (tmp_path / "x" / "bad.png").write_bytes(b"not an image")
    good = (tmp_path / "x" / "0.png").read_bytes()
    (tmp_path / "x" / "trunc.png").write_bytes(good[: len(good) // 2])
    ds = FileImages(str(tmp_path), labelled=False)
    loaded = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in loaded) == 2
    names = [p.name for p, _ in ds.items]  # sorted: 0..5.png, bad.png, trunc.png
    sub = Substituting(ds)
    for i, name in enumerate(names):  # an unreadable file gives the next readable one (wrapping), and says so
        img, bad = sub[i]
        want = {"bad.png": 0, "trunc.png": 0}.get(name, i)
        assert bad == ((6, 7) if name == "bad.png" else (7,) if name == "trunc.png" else ()), name  # by index
        assert np.array_equal(np.asarray(img[0]), np.asarray(ds[want][0])), name
    counter = BadImageCounter(0.5, len(ds))
    counter.update(8, [6, 7])
    counter.update(8, [7])  # the same file again, in another epoch: a read, not a new file
    assert (counter.bad, counter.seen, counter.files) == (3, 16, {6, 7})
    counter.check(counter.bad, counter.seen)  # 19 % <= 50 %
    with pytest.raises(MimcoError, match="2 of 8 images could not be read"):
        BadImageCounter(0.1, len(ds)).check(2, 8)
    with pytest.raises(MimcoError, match="3 of 9 images"):  # given the counts of every process, summed
        BadImageCounter(0.3, len(ds)).check(3, 9)


def test_batch_views_shapes_and_normalisation():
    data = DataConfig(name="procedural", img_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    x = torch.from_numpy(make_shapes(8, 16)[0])
    v1, v2 = BatchTwoViews(ContrastiveAugConfig(), data)(x)
    assert v1.shape == v2.shape == (8, 3, 16, 16) and v1.dtype == torch.float32
    assert v1.min() >= -1.0 - 1e-5 and v1.max() <= 1.0 + 1e-5 and not torch.equal(v1, v2)
    (v,) = BatchMimView(MimAugConfig(), data)(x)
    assert v.shape == (8, 3, 16, 16)
    grey = BatchTwoViews(ContrastiveAugConfig(), DataConfig(img_size=16, channels=1))(x[:, :1])
    assert grey[0].shape == (8, 1, 16, 16)


def test_per_image_views_for_files():
    img = Image.fromarray((np.random.rand(50, 70, 3) * 255).astype(np.uint8))
    v1, v2 = image_two_views(ContrastiveAugConfig(), DataConfig(img_size=32))(img)
    assert v1.shape == v2.shape == (3, 32, 32)


def test_batch_stream_resumes_in_place():
    ds = load_dataset(DataConfig(name="procedural", img_size=16, procedural_size=100))
    ident = lambda x: [x]  # noqa: E731
    s = BatchStream(ds, 32, seed=0, device=torch.device("cpu"), batch_transform=ident)
    assert s.steps_per_epoch == 3
    it = s(0)
    full = [next(it)[0] for _ in range(7)]
    it = s(4)
    resumed = [next(it)[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed))
    assert not torch.equal(full[0], full[3])  # a new permutation each epoch
    with pytest.raises(MimcoError, match="larger than the dataset"):
        BatchStream(ds, 128, 0, torch.device("cpu"), ident)


def test_file_views_depend_on_image_and_epoch_only(tmp_path):
    """Per-image augmentation is seeded by (seed, epoch, image): the same batches with 0 or 2 loader
    workers and from a stream started mid-run, different in the next epoch, and the caller's
    global generators are neither read nor moved."""
    _save_images(tmp_path / "x", 12)
    cfg = DataConfig(name="folder", root=str(tmp_path), img_size=16)

    def batches(workers: int, start: int, n: int) -> list[torch.Tensor]:
        ds = FileImages(str(tmp_path), labelled=False, transform=image_two_views(ContrastiveAugConfig(), cfg))
        it = BatchStream(ds, 4, seed=5, device=torch.device("cpu"), num_workers=workers)(start)
        return [torch.cat(next(it)) for _ in range(n)]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    plain = batches(0, 0, 6)  # two epochs of 3 steps
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(2, 0, 6)))
    assert all(torch.equal(a, b) for a, b in zip(plain[4:], batches(0, 4, 2)))  # resumed at step 4
    # epoch 1 visits the images in another order with new views: no batch repeats an epoch-0 batch
    assert not any(torch.equal(a, b) for a in plain[:3] for b in plain[3:])


def test_batched_ops_follow_torchvisions_definitions():
    """The batched views draw their random parameters on the batch's device; each op is
    torchvision's (same factors give the same images) and each draws from torchvision's
    distributions (crop boxes, and the probability each op is applied with)."""
    import torch.nn.functional as F
    from torchvision.transforms import RandomResizedCrop as TvCrop
    from torchvision.transforms.v2 import functional as TF

    from mimco.data import transforms as T

    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 30)
    for k, f, ref in ((0, 1.4, TF.adjust_brightness), (1, 1.5, TF.adjust_contrast), (2, 0.3, TF.adjust_saturation),
                      (3, 0.2, TF.adjust_hue), (3, -0.45, TF.adjust_hue)):
        jitter = T.ColorJitter(0, 0, 0, 0)
        jitter.ranges[k] = (f, f)  # one part at a fixed factor, the others neutral
        # up to the luma weights' rounding (torchvision 0.2989 for red, kornia and mimco 0.299)
        assert torch.allclose(jitter(x), ref(x, f), atol=1e-4), (k, f)
    blur = T.RandomGaussianBlur(5, (1.3, 1.3), p=1.0)
    assert torch.allclose(blur(x), TF.gaussian_blur(x, [5, 5], [1.3, 1.3]), atol=1e-5)
    assert torch.equal(T.RandomSolarize(1.0)(x), TF.solarize(x, 0.5))
    crop = T.RandomResizedCrop(16, (0.08, 1.0))
    torch.manual_seed(1)
    x0, y0, w, h = (v.long().tolist() for v in crop.boxes(x))
    torch.manual_seed(1)
    got = crop(x)
    for b in range(len(x)):  # the sliced crop resized
        want = F.interpolate(x[b : b + 1, :, y0[b] : y0[b] + h[b], x0[b] : x0[b] + w[b]], size=16, mode="bilinear")
        assert torch.allclose(got[b : b + 1], want, atol=1e-5)

    n = 4000
    many = torch.rand(n, 3, 20, 30)
    x0, y0, w, h = crop.boxes(many)
    assert ((x0 >= 0) & (x0 + w <= 30) & (y0 >= 0) & (y0 + h <= 20)).all()
    tv = torch.tensor([TvCrop.get_params(many[0], [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]).float()
    ti, tj, th, tw = tv.unbind(1)
    for ours, theirs in ((w * h / 600, tw * th / 600), (w / h, tw / th), (x0 / (31 - w), tj / (31 - tw)),
                         (y0 / (21 - h), ti / (21 - th))):
        assert abs(ours.mean() - theirs.mean()) < 0.03 and abs(ours.std() - theirs.std()) < 0.03
    for op, p in ((T.RandomHorizontalFlip(0.5), 0.5), (T.RandomGrayscale(0.2), 0.2), (T.RandomSolarize(0.2), 0.2),
                  (T.RandomGaussianBlur(5, (0.1, 2.0), 0.5), 0.5), (T.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), 0.8)):
        changed = (op(many) - many).abs().flatten(1).amax(1) > 1e-6
        assert abs(changed.float().mean().item() - p) < 0.03, (op, p)
    factor = T.ColorJitter(0.4, 0, 0, 0)(torch.full((n, 3, 2, 2), 0.5))[:, 0, 0, 0] / 0.5  # brightness in [0.6, 1.4]
    assert factor.min() >= 0.6 and factor.max() <= 1.4 and abs(factor.mean() - 1) < 0.01
    assert abs(factor.std() - 0.8 / 12**0.5) < 0.01
