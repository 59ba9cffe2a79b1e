"""data.decode=gpu: workers read bytes and draw crops; the device decodes, crops and augments."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from mimco.config import ContrastiveAugConfig, DataConfig
from mimco.data.device_decode import DeviceViews, EncodedFiles
from mimco.data.files import FileImages, Substituting
from mimco.data.transforms import BatchTwoViews
from mimco.errors import MimcoError
from mimco.pipeline import run_stage
from tests.helpers import tiny_teacher_cfg

CROPS = [((0.2, 1.0), (3 / 4, 4 / 3))] * 2


def _folder(root, n=24, seed=0):
    """Smooth RGB JPEGs of varied sizes in 2 classes, a PNG, a grey JPEG, an empty and a truncated file."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        small = (rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(root / "ab"[i % 2] / f"{i:03d}.jpg", quality=95)
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / "a" / "p.png")
    Image.fromarray((rng.random((30, 30)) * 255).astype(np.uint8)).save(root / "a" / "grey.jpg", quality=95)
    (root / "b" / "empty.jpg").write_bytes(b"")
    good = (root / "a" / "000.jpg").read_bytes()
    (root / "b" / "trunc.jpg").write_bytes(good[: 2 * len(good) // 3])  # the header reads, the data does not


def _item(files, path):
    return [i for i, (p, _) in enumerate(files.items) if p.name == path][0]


def test_crops_match_a_pil_reference(tmp_path):
    """Each view's crop is the box the worker drew, cut from the decoded image and resized to S:
    compared with PIL decoding, cropping and resizing the same box (antialiased bilinear)."""
    _folder(tmp_path / "imgs")
    files = FileImages(str(tmp_path / "imgs"), labelled=True)
    enc = EncodedFiles(files, CROPS)
    idx = [i for i, (p, _) in enumerate(files.items) if p.suffix == ".jpg" and p.stem.isdigit()][:6]
    torch.manual_seed(0)
    items = [enc[i] for i in idx]
    assert all(x[0].ndim == 1 for x in items)  # JPEG bytes, not pixels
    (packed, labels), bad = EncodedFiles.collate([(x, ()) for x in items])
    assert bad == [] and labels.tolist() == [files.items[i][1] for i in idx]
    dv = DeviceViews(BatchTwoViews(ContrastiveAugConfig(), DataConfig(img_size=16), crop=False), 16, 3,
                     torch.device("cpu"))
    images, n_bad = dv.decode(packed.items())
    assert n_bad == 0
    for v in range(2):
        got = dv.crop(images, packed.boxes[:, v])
        for b, i in enumerate(idx):
            t, left, h, w = packed.boxes[b, v].tolist()
            with Image.open(files.items[i][0]) as im:
                W, H = im.size
                assert 0 <= t and t + h <= H and 0 <= left and left + w <= W
                ref = im.convert("RGB").crop((left, t, left + w, t + h)).resize((16, 16), Image.BILINEAR)
            ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
            assert (got[b] - ref).abs().mean() < 0.02, (i, v)


def test_other_formats_grey_and_broken_files(tmp_path):
    _folder(tmp_path / "imgs")
    files = FileImages(str(tmp_path / "imgs"), labelled=True)
    enc = EncodedFiles(files, CROPS)
    assert enc[_item(files, "empty.jpg")] is None
    png, grey, trunc = (enc[_item(files, n)] for n in ("p.png", "grey.jpg", "trunc.jpg"))
    assert png[0].shape == (3, 20, 20) and grey[0].ndim == 1 and trunc[0].ndim == 1  # PNG decoded by the worker
    first = enc[_item(files, "000.jpg")]
    (packed, _), _ = EncodedFiles.collate([(x, ()) for x in (first, trunc, png, grey)])
    dv = DeviceViews(BatchTwoViews(ContrastiveAugConfig(), DataConfig(img_size=16), crop=False), 16, 3,
                     torch.device("cpu"))
    images, bad = dv.decode(packed.items())
    assert bad == 1 and len(images) == 4  # the truncated JPEG is counted and replaced by the image before it
    assert images[1] is images[0] and images[2].shape == (3, 20, 20) and images[3].shape == (3, 30, 30)
    assert torch.equal(images[3][0], images[3][2])  # grey repeated to 3 channels
    views, bad = dv(packed)
    assert bad == 1 and [tuple(v.shape) for v in views] == [(4, 3, 16,
                                                             16)] * 2 and all(v.isfinite().all() for v in views)


def test_boxes_are_drawn_per_image_not_per_worker(tmp_path):
    _folder(tmp_path / "imgs")
    sub = Substituting(EncodedFiles(FileImages(str(tmp_path / "imgs"), labelled=True), CROPS), seed=3)
    torch.manual_seed(123)
    a = sub[5][0][1]
    torch.manual_seed(456)  # another worker's state
    assert torch.equal(sub[5][0][1], a) and not torch.equal(sub[5 + len(sub)][0][1], a)  # the next epoch differs


def _losses(path):
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_from_a_jpeg_folder_decoded_on_the_device(tmp_path, capsys):
    """A MoCo v3 run with data.decode=gpu (libjpeg on this CPU device): the same losses with 0 and
    2 loader workers, unreadable files counted once at the end."""
    _folder(tmp_path / "imgs", n=60)
    common = ("data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.decode=gpu", "optim.batch_size=16",
              "train.log_every=1", "data.max_bad_fraction=0.2", "optim.epochs=2")
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "w0", (*common, "data.num_workers=0")))
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "w2", (*common, "data.num_workers=2")))
    a, b = _losses(tmp_path / "w0" / "log.csv"), _losses(tmp_path / "w2" / "log.csv")
    assert len(a) == 8 and a == b and all(np.isfinite(a))
    err = capsys.readouterr().err
    assert err.count("mimco: skipped ") == 2 and " unreadable files of 64 (" in err and "empty.jpg" in err


@pytest.mark.parametrize("extra, message", [
    (("data.decode=nvjpeg",), "unknown data.decode 'nvjpeg'; choose cpu or gpu"),
    (("data.decode=gpu",), "data.decode=gpu decodes image files on the device; it does not apply to procedural"),
])
def test_bad_decode_settings(tmp_path, extra, message):
    with pytest.raises(MimcoError, match=message):
        run_stage("teacher", tiny_teacher_cfg(tmp_path, "x", extra))


def test_cuda_decode_runs_on_a_side_stream_handed_over_to_the_training_stream(monkeypatch):
    """The ordering rule of a CUDA decode, with torch.cuda's streams recorded by stand-ins: the batched
    decode runs while a side stream is current (so its outputs never reuse a block the training
    stream's queued kernels still read), each output is record_stream'ed on the training stream, and
    the training stream waits for the side stream before it reads them. Breaking any of the three
    fails here; a CPU device calls none of it."""
    import mimco.data.device_decode as dd

    events, state = [], {"current": "train"}

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    train = Stream("train")

    class Ctx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            state["current"] = self.s.name

        def __exit__(self, *exc):
            state["current"] = "train"

    class Out:
        def record_stream(self, s):
            events.append(f"record on {s.name}")

    def decode(data, mode, device):
        events.append(f"decode on {state['current']}")
        return [Out() for _ in data] if isinstance(data, list) else Out()

    monkeypatch.setattr(dd, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: train)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", Ctx)
    monkeypatch.setattr(dd, "decode_jpeg", decode)
    views = DeviceViews(torch.nn.Identity(), 8, 3, torch.device("cuda", 0))
    got, bad = views.decode([torch.zeros(10, dtype=torch.uint8), torch.zeros(12, dtype=torch.uint8)])
    assert bad == 0 and len(got) == 2
    assert events == ["side waits train", "decode on side", "record on train", "record on train", "train waits side"]
