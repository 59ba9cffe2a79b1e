"""Hugging Face datasets (data.name=hf): a DatasetDict saved with save_to_disk and parquet files,
made here with the real `datasets` package, read like the image folder they hold."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimco.config import DataConfig
from mimco.data.build import load_dataset
from mimco.data.procedural import CLASSES, make_shapes
from mimco.errors import MimcoError
from tests.helpers import ENV, HANG, ROOT, TINY_MODEL

datasets = pytest.importorskip("datasets")


def _split(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    images, labels = make_shapes(n, 16, seed=seed)
    return [Image.fromarray(x.transpose(1, 2, 0)) for x in images], labels.tolist()


def _dataset(n: int, seed: int) -> datasets.Dataset:
    images, labels = _split(n, seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                  "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels, "caption": ["x"] * n}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dd = datasets.DatasetDict({"train": _dataset(64, 0), "test": _dataset(32, 1)})
    dd.save_to_disk(str(root / "saved"))
    (root / "parquet" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    dd["test"].to_parquet(str(root / "parquet" / "data" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture(autouse=True)
def own_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_a_saved_dataset_and_parquet_files_read_as_their_images(saved, layout):
    for train, seed, n in ((True, 0, 64), (False, 1, 32)):
        ds = load_dataset(DataConfig(name="hf", root=str(saved / layout)), train)
        images, labels = _split(n, seed)
        assert len(ds) == n and ds.classes == list(CLASSES) and [c for _, c in ds.items] == labels
        for i in (0, 7, n - 1):
            assert np.array_equal(np.asarray(ds.load(i)), np.asarray(images[i]))


def test_one_split_alone_and_the_evaluation_split_from_val_root(saved, tmp_path):
    _dataset(16, 2).save_to_disk(str(tmp_path / "one"))
    cfg = DataConfig(name="hf", root=str(tmp_path / "one"))
    assert len(load_dataset(cfg, True)) == 16 and load_dataset(cfg, False) is None
    cfg = DataConfig(name="hf", root=str(tmp_path / "one"), val_root=str(saved / "saved"))
    assert len(load_dataset(cfg, False)) == 32  # its test split


def test_columns_and_sources_that_do_not_fit_are_one_line(saved, tmp_path):
    with pytest.raises(MimcoError, match=r"data.image_column=img is not a column of .* \(columns: image, label, "
                                         r"caption\); set data.image_column"):
        load_dataset(DataConfig(name="hf", root=str(saved / "saved"), image_column="img"), True)
    with pytest.raises(MimcoError, match="does not exist; data.name=hf reads a folder saved by"):
        load_dataset(DataConfig(name="hf", root=str(tmp_path / "none")), True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimcoError, match="cannot be read by datasets.load_from_disk"):
        load_dataset(DataConfig(name="hf", root=str(tmp_path / "empty")), True)
    unlabelled = load_dataset(DataConfig(name="hf", root=str(saved / "saved"), label_column="none"), True)
    assert all(c == -1 for _, c in unlabelled.items) and unlabelled.classes == []


def test_an_unreadable_image_reads_as_none(tmp_path):
    images, labels = _split(4, 0)
    raw = [{"bytes": b"not an image", "path": None}] + [{"bytes": _png(im), "path": None} for im in images[1:]]
    ds = datasets.Dataset.from_dict({"image": raw, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "bad"))
    got = load_dataset(DataConfig(name="hf", root=str(tmp_path / "bad")), True)
    assert got.load(0) is None and got.load(1) is not None and got.classes == [str(c) for c in range(max(labels) + 1)]


def _png(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_training_on_a_saved_dataset_is_training_on_the_same_folder(tmp_path):
    """The same images in the same order as a folder of them (class by class): the same losses."""
    splits = {}
    for split, (n, seed) in (("train", (64, 0)), ("test", (32, 1))):
        images, labels = _split(n, seed)
        order = sorted(range(n), key=lambda i: labels[i])  # a folder lists its images class by class
        splits[split] = datasets.Dataset.from_dict(
            {"image": [images[i] for i in order], "label": [labels[i] for i in order]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
        for i in order:
            d = tmp_path / "imgs" / ("train" if split == "train" else "val") / f"{labels[i]}_{CLASSES[labels[i]]}"
            d.mkdir(parents=True, exist_ok=True)
            images[i].save(d / f"{i:03d}.png")
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    common = ["teacher", *TINY_MODEL, "data.img_size=16", "data.num_workers=0", "optim.batch_size=16",
              "optim.epochs=2", "optim.warmup_epochs=0.5", "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1",
              "train.log_every=1", "train.progress=false", "eval.at_end=true", "eval.knn_k=5",
              f"train.out_dir={tmp_path}"]
    env = {**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    for name, data in (("folder", ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}"]),
                       ("hf", ["data.name=hf", f"data.root={tmp_path / 'saved'}"])):
        r = subprocess.run([sys.executable, "-m", "mimco", *common, *data, f"train.name={name}"], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=HANG)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (list(csv.DictReader(open(Path(tmp_path) / d / "log.csv"))) for d in ("folder", "hf"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 8
