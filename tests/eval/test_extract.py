"""`mimco extract`: CLS, mean-pooled and patch features with labels and names, in dataset order."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimco.cli.main import main
from mimco.config import PretrainConfig, load_config
from mimco.data.build import load_dataset
from mimco.eval.extract import read_names
from mimco.eval.features import extract_features
from mimco.models.formats import load_backbone
from tests.helpers import TINY_DATA, messy_folder


@pytest.mark.slow
def test_safetensors_holds_every_output_in_dataset_order(monitored_run, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(monitored_run / "last.pt"), "--out", str(out), "--patch", "train.progress=false"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = load_file(str(out))
    cfg = load_config(PretrainConfig, None, TINY_DATA)
    test = load_dataset(cfg.data, train=False)
    model, _ = load_backbone(str(monitored_run / "last.pt"))
    cls, labels = extract_features(model, test, cfg.data, torch.device("cpu"))
    mean, _ = extract_features(model, test, cfg.data, torch.device("cpu"), pool="mean")
    assert torch.equal(got["index"], torch.arange(len(test))) and torch.equal(got["labels"], labels)
    assert torch.allclose(got["cls"], cls, atol=1e-5) and torch.allclose(got["mean"], mean, atol=1e-5)
    assert got["patch"].shape == (len(test), 16, 32) and got["patch"].dtype == torch.float16
    assert torch.allclose(got["patch"].float().mean(1), mean, atol=1e-2)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "names" not in meta and read_names(out) == [] and json.loads(meta["mimco"])["split"] == "test"


@pytest.mark.slow
def test_npz_of_a_folder_names_its_files_and_leaves_out_unreadable_ones(monitored_run, tmp_path, capsys):
    messy_folder(tmp_path / "imgs")
    out = tmp_path / "f.npz"
    args = ["extract", str(monitored_run / "last.pt"), "--out", str(out), "--split", "train", "data.name=folder",
            f"data.root={tmp_path / 'imgs'}", "data.num_workers=0", "train.progress=false"]
    assert main(args) == 0
    got = np.load(out)
    names = [n.rsplit("/", 1)[-1] for n in got["names"]]
    assert len(names) == len(got["cls"]) == 25 and "empty.jpg" not in names and "text.jpg" not in names
    assert (got["labels"] == -1).all() and "patch" not in got.files
    assert read_names(out) == list(got["names"])
    # the safetensors file: the same names, as a tensor of UTF-8 bytes (the header stays small)
    st = tmp_path / "f.safetensors"
    assert main([*args[:3], str(st), *args[4:]]) == 0
    assert read_names(st) == list(got["names"]) and torch.equal(load_file(str(st))["index"],
                                                                 torch.from_numpy(got["index"]))
    with safe_open(str(st), "pt") as f:
        assert set(f.metadata()) == {"mimco"}
    assert main(args) == 2  # never overwritten
    assert f"--out {out} exists" in capsys.readouterr().err


def test_an_unknown_file_type_is_refused_before_anything_is_read(tmp_path, capsys):
    assert main(["extract", str(tmp_path / "no.pt"), "--out", str(tmp_path / "f.txt")]) == 2
    assert "--out " in (err := capsys.readouterr().err) and "write a .safetensors or .npz file" in err
    assert not (tmp_path / "f.txt").exists()
