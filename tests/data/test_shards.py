"""WebDataset shards: written by `mimco shards` (and by webdataset's own ShardWriter), read as a
dataset like the image folder they came from; damaged ones said in one line, nothing lost."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimco.cli.main import main
from mimco.config import DataConfig
from mimco.data import shards
from mimco.data.build import load_dataset
from mimco.data.procedural import make_shapes
from mimco.errors import MimcoError
from tests.helpers import ENV, HANG, ROOT, TINY_MODEL, TORCHRUN

pytest.importorskip("webdataset")


def shapes_folder(root: Path, n: int = 96, size: int = 16) -> Path:
    """A labelled folder with train/ and val/: PNGs and JPEGs of procedural shapes (4 classes)."""
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = make_shapes(n if split == "train" else n // 2, size, seed=seed)
        for i, (x, y) in enumerate(zip(images, labels)):
            d = root / split / f"c{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.transpose(1, 2, 0)).save(d / f"{i:03d}.{'jpg' if i % 3 else 'png'}")
    return root


def _write(src: Path | str, out: Path, *extra: str) -> int:
    return main(["shards", str(src), "--out", str(out), "--quiet", *extra])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def test_shards_of_a_folder_are_its_images_in_its_order(tmp_path, capsys):
    src = shapes_folder(tmp_path / "imgs")
    for split in ("train", "val"):
        assert _write(src, tmp_path / "sh" / split, "--split", split, "--shard-size", "8K") == 0
    assert "read them with data.name=shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "sh" / "train" / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and len(index["shardlist"]) > 3  # 8 KB shards: several
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sh" / "train" / "index.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not private
    for train in (True, False):
        folder = load_dataset(DataConfig(name="imagefolder", root=str(src)), train)
        sharded = load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh")), train)
        assert len(sharded) == len(folder) and sharded.classes == folder.classes
        assert [c for _, c in sharded.items] == [c for _, c in folder.items]
        for i in range(len(folder)):  # the files' own bytes: the same pixels
            assert sharded.read(i) == folder.read(i)
            assert np.array_equal(np.asarray(sharded.load(i)), np.asarray(folder.load(i)))


def test_wids_reads_the_index_as_it_is_and_a_sample_is_read_at_its_offset(tmp_path):
    """index.json is wids' descriptor (wids' own reader gives the same samples); mimco reads a
    sample's bytes with one read at the offset the index holds."""
    wids = pytest.importorskip("wids")
    src = shapes_folder(tmp_path / "imgs")
    assert _write(src, tmp_path / "sh", "--shard-size", "8K") == 0
    theirs = wids.ShardListDataset(str(tmp_path / "sh" / "index.json"), transformations=[],
                                   cache_dir=str(tmp_path / "wids-cache"))
    ours = load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh")), True)
    assert len(theirs) == len(ours) == 96
    for i in (0, 17, 95):
        sample = theirs[i]
        image = sample.get(".jpg", sample.get(".png"))
        assert image.read() == ours.read(i) and int(sample[".cls"].read()) == ours.items[i][1]


def test_shards_written_by_webdataset_itself_are_read_by_a_brace_pattern(tmp_path, capfd):
    import webdataset as wds

    images, labels = make_shapes(40, 16, seed=0)
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%04d.tar"), maxcount=16) as sink:
        for i, (x, y) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"s{i:05d}", "png": Image.fromarray(x.transpose(1, 2, 0)), "cls": int(y)})
    pattern = str(tmp_path / "wds" / "part-{0000..0002}.tar")
    ds = load_dataset(DataConfig(name="shards", root=pattern), True)
    assert len(ds) == 40 and [c for _, c in ds.items] == labels.tolist() and len(ds.classes) == int(labels.max()) + 1
    assert np.array_equal(np.asarray(ds.load(17)), images[17].transpose(1, 2, 0))
    assert "reading where the samples and labels of 3 shards are, once" in capfd.readouterr().err
    load_dataset(DataConfig(name="shards", root=pattern), True)
    assert "reading" not in capfd.readouterr().err  # kept in the cache folder for later starts
    assert load_dataset(DataConfig(name="shards", root=pattern), False) is None  # a pattern names one split


def test_an_interrupted_write_continues_and_a_finished_one_is_kept(tmp_path, monkeypatch, capsys):
    src = shapes_folder(tmp_path / "imgs")
    assert _write(src, tmp_path / "whole", "--shard-size", "6K") == 0
    real, calls = shards._encoded, [0]

    def dies(dataset, i):
        calls[0] += 1
        if calls[0] == 60:
            raise KeyboardInterrupt
        return real(dataset, i)

    monkeypatch.setattr(shards, "_encoded", dies)
    assert _write(src, tmp_path / "cut", "--shard-size", "6K") == 130
    monkeypatch.setattr(shards, "_encoded", real)
    written = sorted(p.name for p in (tmp_path / "cut").glob("*.tar"))
    assert written and not (tmp_path / "cut" / "index.json").exists()
    assert _write(src, tmp_path / "cut", "--shard-size", "6K") == 0
    assert "continuing the write" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("whole", "cut"))
    assert [(s["url"], s["nsamples"], s["labels"]) for s in a["shardlist"]] == \
           [(s["url"], s["nsamples"], s["labels"]) for s in b["shardlist"]]
    for s in a["shardlist"]:
        assert (tmp_path / "whole" / s["url"]).read_bytes() == (tmp_path / "cut" / s["url"]).read_bytes()
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("cut", "whole")]
    assert names[0] == names[1]
    before = (tmp_path / "cut" / "index.json").read_bytes()
    assert _write(src, tmp_path / "cut") == 2  # never overwritten
    assert "holds shards already" in capsys.readouterr().err
    assert (tmp_path / "cut" / "index.json").read_bytes() == before
    assert _write(src, tmp_path / "cut", "--shard-size", "7K") == 2


def test_unreadable_images_are_left_out_of_the_shards_and_counted(tmp_path, capsys):
    from tests.helpers import messy_folder

    messy_folder(tmp_path / "imgs")
    assert _write(tmp_path / "imgs", tmp_path / "sh") == 0
    assert "25 images, 0 classes" in (out := capsys.readouterr().out) and "(2 unreadable images left out)" in out
    ds = load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh"), channels=3), True)
    assert len(ds) == 25 and all(c == -1 for _, c in ds.items) and all(ds.load(i) is not None for i in range(25))


def test_a_truncated_shard_is_one_line_and_its_samples_count_as_unreadable(tmp_path, capfd):
    src = shapes_folder(tmp_path / "imgs")
    assert _write(src, tmp_path / "sh", "--shard-size", "8K") == 0
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    second = tmp_path / "sh" / index["shardlist"][1]["url"]
    second.write_bytes(second.read_bytes()[:3000])  # cut mid-sample
    capfd.readouterr()
    ds = load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh")), True)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"shard {second} is 3000 bytes, its index says" in err
    first, n2 = index["shardlist"][0]["nsamples"], index["shardlist"][1]["nsamples"]
    read = [ds.read(i) is not None for i in range(first, first + n2)]
    assert not all(read) and all(ds.read(i) is not None for i in range(first))  # the other shards are whole


def test_samples_without_labels_are_left_out_and_labels_outside_the_index_refused(tmp_path, capfd):
    import webdataset as wds

    images, labels = make_shapes(12, 16, seed=0)
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i, (x, y) in enumerate(zip(images, labels)):
            sample = {"__key__": f"s{i:03d}", "png": Image.fromarray(x.transpose(1, 2, 0))}
            if i != 5:
                sample["cls"] = int(y)
            sink.write(sample)
    ds = load_dataset(DataConfig(name="shards", root=str(tmp_path / "a.tar")), True)
    assert len(ds) == 11 and "1 of 12 samples in the shards have no label (.cls); left out" in capfd.readouterr().err
    (tmp_path / "idx").mkdir()
    desc = {"__kind__": shards.KIND, "shardlist": [{"url": str(tmp_path / "a.tar"), "nsamples": 12,
                                                     "labels": [9] + [0] * 11}], "mimco": {"classes": ["x", "y"]}}
    (tmp_path / "idx" / "index.json").write_text(json.dumps(desc))
    with pytest.raises(MimcoError, match=r"s\d*|a.tar#0 has label 9, outside the index's 2 classes"):
        load_dataset(DataConfig(name="shards", root=str(tmp_path / "idx")), True)
    with pytest.raises(MimcoError, match="is not a shard index"):
        (tmp_path / "idx" / "index.json").write_text("{}")
        load_dataset(DataConfig(name="shards", root=str(tmp_path / "idx")), True)


def test_a_corrupt_sample_trains_as_an_unreadable_file_counted_once(tmp_path, capsys):
    """A sample whose image bytes do not decode (written by webdataset's own writer) is replaced
    like an unreadable file and counted in the same line, under the same limit."""
    import webdataset as wds

    from mimco.pipeline import run_stage
    from tests.helpers import tiny_teacher_cfg

    images, labels = make_shapes(40, 16, seed=0)
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i, (x, y) in enumerate(zip(images, labels)):
            png = b"not an image" if i == 7 else Image.fromarray(x.transpose(1, 2, 0))
            sink.write({"__key__": f"s{i:03d}", "png": png, "cls": int(y)})
    common = ("data.name=shards", f"data.root={tmp_path / 'a.tar'}", "optim.batch_size=16", "optim.epochs=2",
              "data.num_workers=0", "data.max_bad_fraction=0.05")
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "ok", common))
    err = capsys.readouterr().err
    assert err.count("mimco: skipped ") == 1 and "skipped 1 unreadable files of 40 (" in err and "a.tar#7" in err
    over = "could not be read .more than data.max_bad_fraction"  # over the limit: stopped, as for a folder
    with pytest.raises(MimcoError, match=over):
        run_stage("teacher", tiny_teacher_cfg(tmp_path, "strict", (*common, "data.max_bad_fraction=0.001")))


def test_the_cache_and_the_device_decode_read_shards_as_the_folder(tmp_path):
    """data.cache=true and data.decode=gpu (libjpeg on this CPU device) give the folder's batches."""
    from mimco.config import TeacherStageConfig, load_config
    from mimco.data.stream import build_stream

    src = shapes_folder(tmp_path / "imgs", n=48)
    assert _write(src, tmp_path / "sh" / "train", "--shard-size", "8K") == 0
    base = ["data.img_size=16", "optim.batch_size=16", "data.num_workers=0", "train.progress=false"]
    for extra in ("data.cache=true", "data.decode=gpu"):
        got = []
        sources = (["data.name=imagefolder", f"data.root={src}"], ["data.name=shards", f"data.root={tmp_path / 'sh'}"])
        for source in sources:
            cfg = load_config(TeacherStageConfig, None, [*base, *source, extra], model_keys=False)
            it = build_stream(cfg, torch.device("cpu"), "two")(0)
            torch.manual_seed(0)  # batched views on the device draw from the process's generator
            got.append([next(it) for _ in range(3)])
        for a, b in zip(*got):
            for x, y in zip(a, b):
                assert torch.equal(x, y), extra


def test_the_shuffle_buffer_keeps_each_window_within_few_shards_and_is_seeded(tmp_path):
    src = shapes_folder(tmp_path / "imgs", n=200)
    assert _write(src, tmp_path / "sh", "--shard-size", "40K") == 0
    ds = load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh"), shuffle_buffer=16), True)
    assert min(ds.lengths[:-1]) >= 16 and len(ds.lengths) >= 4
    a, b, c = ds.epoch_order(0, 0), ds.epoch_order(0, 0), ds.epoch_order(0, 1)
    assert torch.equal(a, b) and not torch.equal(a, c) and sorted(a.tolist()) == list(range(len(ds)))
    shard = [shards._shard_of(ds.starts, int(i)) for i in a]
    windows = [set(shard[w : w + 16]) for w in range(0, len(shard), 16)]
    assert max(len(w) for w in windows) <= 2 and len(set(shard[:32])) < len(ds.lengths)
    assert load_dataset(DataConfig(name="shards", root=str(tmp_path / "sh")), True).epoch_order(0, 0) is None


def test_a_missing_package_or_source_is_one_line(tmp_path, capsys, monkeypatch):
    assert main(["shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "is neither a folder of images nor one of" in capsys.readouterr().err
    assert main(["shards", "procedural", "--out", str(tmp_path / "o"), "--shard-size", "lots"]) == 2
    assert "--shard-size lots: give bytes" in capsys.readouterr().err
    with pytest.raises(MimcoError, match="does not exist; write the shards with `mimco shards`"):
        load_dataset(DataConfig(name="shards", root=str(tmp_path / "none")), True)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    assert main(["shards", "procedural", "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'mimco[shards]'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _log(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "log.csv")))


@pytest.mark.slow
def test_training_on_shards_is_training_on_the_folder_and_resumes_exactly_on_two_processes(tmp_path):
    """The same images in the same order: a teacher run on the shards logs the folder run's losses;
    stopped mid-epoch on 2 gloo processes and resumed (with a shuffle buffer), it ends with the uninterrupted run's
    weights; `mimco extract` of the evaluation split under 2 processes gives each sample once."""
    from mimco.runs import load_checkpoint

    src = shapes_folder(tmp_path / "imgs", n=96)
    assert _write(src, tmp_path / "sh" / "train", "--shard-size", "8K") == 0
    assert _write(src, tmp_path / "sh" / "val", "--split", "val", "--shard-size", "8K") == 0
    common = ["teacher", *TINY_MODEL, "data.img_size=16", "data.num_workers=2", "optim.batch_size=16",
              "optim.epochs=2", "optim.warmup_epochs=0.5", "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1",
              "train.log_every=1", "train.progress=false", "eval.at_end=true", "eval.knn_k=5",
              f"train.out_dir={tmp_path}"]
    folder = ["data.name=imagefolder", f"data.root={src}"]
    sharded = ["data.name=shards", f"data.root={tmp_path / 'sh'}"]

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                           timeout=HANG)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    run([sys.executable, "-m", "mimco", *common, *folder, "train.name=folder"])
    run([sys.executable, "-m", "mimco", *common, *sharded, "train.name=shards"])
    a, b = _log(tmp_path / "folder"), _log(tmp_path / "shards")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 12
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("folder", "shards"))
    assert sa["knn_top1"] == sb["knn_top1"]

    local = [*sharded, "data.shuffle_buffer=32"]  # the shard-local order resumes exactly too
    run([*TORCHRUN, "-m", "mimco", *common, *local, "train.name=two"])
    run([*TORCHRUN, "-m", "mimco", *common, *local, "train.name=cut", "train.max_steps=5"])  # mid-epoch 1
    run([*TORCHRUN, "-m", "mimco", "teacher", "--resume", str(tmp_path / "cut" / "last.pt")])
    x, y = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("two", "cut"))
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-6), k
    assert [r["loss"] for r in _log(tmp_path / "two")] == [r["loss"] for r in _log(tmp_path / "cut")]

    out = tmp_path / "f.npz"
    run([*TORCHRUN, "-m", "mimco", "extract", str(tmp_path / "two" / "last.pt"), "--out", str(out), *sharded,
         "data.img_size=16", "train.progress=false"])
    got = np.load(out)
    assert got["index"].tolist() == list(range(48)) and len(set(got["names"].tolist())) == 48
    assert os.path.basename(got["names"][0]).startswith("val-000000.tar#0")
