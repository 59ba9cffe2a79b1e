"""Continued pre-training: model.init_from loads any backbone file into the trained encoders."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimco.cli.main import main
from mimco.config import PretrainConfig, TeacherStageConfig, load_config
from mimco.methods import get_method
from mimco.models.formats import load_backbone
from mimco.models.init_from import init_encoders
from mimco.pipeline import open_run, run_stage
from tests.helpers import TINY_DATA, TINY_MODEL, tiny_overrides


def _method(stage, extra=(), teacher=None):
    cls = TeacherStageConfig if stage == "teacher" else PretrainConfig
    over = [*TINY_DATA, *TINY_MODEL, "moco.mlp_dim=64", "moco.proj_dim=32"] if stage == "teacher" else \
        [*TINY_DATA, *TINY_MODEL, "loss.head_hidden_dim=32", f"teacher.checkpoint={teacher}"]
    cfg = load_config(cls, None, [*over, *extra])
    return get_method(cfg.method, stage).build(cfg, torch.device("cpu"))


def _backbone_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sb if not k.startswith("head.") and k in sa)


@pytest.mark.slow
def test_the_student_starts_from_a_runs_snapshot(monitored_run, teacher_ckpt):
    method = _method("pretrain", teacher=teacher_ckpt)
    report = init_encoders(method, str(monitored_run / "epoch_0002.pt"))
    src, _ = load_backbone(str(monitored_run / "epoch_0002.pt"))
    assert _backbone_equal(method.backbone(), src)
    n = len([k for k in src.state_dict() if not k.startswith("head.")])
    assert f"loaded {n} tensors into backbone; missing none; not used none; resampled none" in report


def test_both_moco_encoders_start_from_a_timm_file_resampled(tmp_path):
    """A timm file trained at another image size: its position table resampled to the model's grid."""
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    method = _method("teacher")  # 16 px: a 4x4 grid, the file's is 8x8
    report = init_encoders(method, str(tmp_path / "model.safetensors"))
    assert "pos_embed (8x8 -> 4x4 grid)" in report and "into momentum and base" in report
    ref, _ = load_backbone(str(tmp_path / "model.safetensors"), img_size=16)
    assert _backbone_equal(method.momentum_encoder, ref) and _backbone_equal(method.base_encoder, ref)
    assert not torch.equal(method.momentum_encoder.pos_embed, src.pos_embed[:, :17])


def test_a_file_of_another_shape_or_without_a_vit_is_a_one_line_error(tmp_path):
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                             embed_dim=48, depth=2, num_heads=2)
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(Exception, match=r"model.init_from=.*wide.safetensors holds a ViT \(width 48.*set model.arch"):
        init_encoders(_method("teacher"), str(tmp_path / "wide.safetensors"))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(Exception, match=r"^model.init_from=.*nothing.safetensors: "):
        init_encoders(_method("teacher"), str(tmp_path / "nothing.safetensors"))


@pytest.mark.slow
def test_a_run_reports_it_and_a_resume_refuses_another_file(tmp_path, monitored_run, capsys):
    snap = str(monitored_run / "epoch_0002.pt")
    over = [*tiny_overrides(tmp_path, "cont"), "moco.mlp_dim=64", "moco.proj_dim=32", "train.max_steps=2",
            f"model.init_from={snap}"]
    assert main(["teacher", *over]) == 0
    assert f"mimco: model.init_from={snap} (mimco pretrain" in capsys.readouterr().err
    with pytest.raises(Exception, match="model.init_from does not apply on resume"):
        open_run("teacher", None, [f"model.init_from={monitored_run / 'last.pt'}"], str(tmp_path / "cont" / "last.pt"))
    # a requeued job repeats its whole command: the run's own value is accepted, and not loaded again
    cfg, state, run_dir = open_run("teacher", None, [f"model.init_from={snap}"], str(tmp_path / "cont" / "last.pt"))
    assert cfg.model.init_from == snap  # the saved config keeps it; the weights come from the checkpoint
    run_stage("teacher", cfg, state, run_dir)
    assert "model.init_from" not in capsys.readouterr().err  # not loaded again over the checkpoint's weights


def test_a_bad_file_stops_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code = main(["teacher", *tiny_overrides(tmp_path, "bad"), "moco.mlp_dim=64", "moco.proj_dim=32",
                 f"model.init_from={tmp_path / 'junk.pt'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.init_from={tmp_path / 'junk.pt'}: " in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
