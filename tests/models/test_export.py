"""`mimco export` writes a timm hub folder: timm builds it by itself, with the run's statistics."""

import json

import pytest
import timm
import torch
from timm.data import resolve_data_config

from mimco.cli.main import main
from mimco.models.formats import load_backbone
from mimco.pipeline import run_stage
from tests.helpers import tiny_teacher_cfg

STATS = ("data.channels=1", "data.mean=[0.286]", "data.std=[0.353]")


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grey")
    run_stage("teacher", tiny_teacher_cfg(out, "g", (*STATS, "train.max_steps=0", "optim.epochs=1",
                                                    "eval.at_end=true", "eval.knn_k=5")))
    return out / "g"


@pytest.mark.slow
def test_timm_builds_the_folder_by_itself_with_the_same_features(grey_run, tmp_path, capsys):
    out = tmp_path / "hub"
    assert main(["export", str(grey_run / "last.pt"), "--out", str(out)]) == 0
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    ours, _ = load_backbone(str(grey_run / "last.pt"))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.forward_features(x), atol=1e-6)
    assert model.num_classes == 0 and model.embed_dim == 32
    data = resolve_data_config({}, model=model)
    assert list(data["mean"]) == [0.286] and list(data["std"]) == [0.353] and tuple(data["input_size"]) == (1, 16, 16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224" and cfg["model_args"]["embed_dim"] == 32
    assert cfg["mimco"]["source_format"].startswith("mimco teacher")


@pytest.mark.slow
def test_the_model_card_comes_from_the_run(grey_run, tmp_path, capsys):
    assert main(["knn", str(grey_run / "last.pt"), "--k", "5"]) == 0  # a result in <run>/eval
    assert main(["export", str(grey_run / "last.pt"), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    summary = json.loads((grey_run / "summary.json").read_text())
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: timm\n")
    assert "| data | procedural, 16 px, mean [0.286], std [0.353] |" in card and "| method | mocov3 |" in card
    assert f"| k-NN top-1 at the end of the run | {summary['knn_top1']:.2f} % |" in card
    assert "`mimco knn` of g/last.pt | knn5_top1" in card
    assert 'timm.create_model("local-dir:card", pretrained=True)' in card


def test_a_standard_architecture_names_its_timm_model(tmp_path):
    from mimco.config import ModelConfig
    from mimco.models import create_vit
    from mimco.models.export import export_timm

    vit = create_vit(ModelConfig(arch="vit_small"), 32)
    export_timm(vit, tmp_path / "s", [0.5] * 3, [0.25] * 3)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["pretrained_cfg"]["crop_pct"] == 1.0
    model = timm.create_model(f"local-dir:{tmp_path / 's'}", pretrained=True)
    assert model.patch_embed.img_size == (32, 32) and list(resolve_data_config({}, model=model)["mean"]) == [0.5] * 3
