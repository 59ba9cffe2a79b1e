from pathlib import Path

import pytest

from mimco.config import PretrainConfig, TeacherStageConfig, all_keys, load_config, save_config
from mimco.errors import MimcoError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  base_lr: 0.01\n  epochs: 3\nmodel:\n  arch: vit_small\n")
    cfg = load_config(TeacherStageConfig, p, ["optim.epochs=5", "model.num_heads=12", "data.mean=[0.1,0.2,0.3]"])
    assert cfg.optim.base_lr == 0.01 and cfg.optim.epochs == 5.0
    assert cfg.model.arch == "vit_small" and cfg.model.num_heads == 12
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert load_config(TeacherStageConfig, None, ["optim.base_lr=1e-3"]).optim.base_lr == 1e-3
    assert cfg.optim.weight_decay == 0.1  # the teacher's MoCo v3 default, not the student's 0.05
    assert load_config(PretrainConfig).optim.weight_decay == 0.05


def test_unknown_key_names_closest():
    with pytest.raises(MimcoError, match=r"unknown config key 'optim.base_lrr'.*optim.base_lr"):
        load_config(TeacherStageConfig, None, ["optim.base_lrr=1"])
    with pytest.raises(MimcoError, match=r"unknown config key 'mask'; valid sections: data, model"):
        load_config(TeacherStageConfig, None, ["mask.ratio=0.5"])  # masks belong to stage 2


def test_wrong_type_and_bad_override():
    with pytest.raises(MimcoError, match="expects int"):
        load_config(TeacherStageConfig, None, ["optim.batch_size=abc"])
    with pytest.raises(MimcoError, match="key=value"):
        load_config(TeacherStageConfig, None, ["optim.batch_size"])
    with pytest.raises(MimcoError, match="not found"):
        load_config(TeacherStageConfig, "/nonexistent.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["mask.ratio=0.75", "loss.patch_negatives=batch"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(PretrainConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_bundled_configs_load(path):
    from mimco.config import SegmentationConfig

    cls = TeacherStageConfig if "teacher" in path.name else SegmentationConfig if "seg" in path.name else PretrainConfig
    cfg = load_config(cls, path, model_keys=cls is not SegmentationConfig)
    if cls is SegmentationConfig:
        assert cfg.data.name == "segfolder" and cfg.train.precision == "bf16"


def test_all_keys_lists_leaves_with_the_methods_own_sections():
    from mimco.config import stage_class

    keys = all_keys(stage_class(PretrainConfig, "mimco"))
    assert "loss.patch_temperature" in keys and "mask.type" in keys and "data" not in keys
    assert "loss.patch_temperature" not in all_keys(stage_class(PretrainConfig, "simmim"))


def test_tf32_on_cuda_only(monkeypatch):
    """train.tf32 (default on) sets the CUDA matmul and cuDNN TF32 flags; a CPU run leaves them alone."""
    import torch

    from mimco.config import TrainConfig
    from mimco.pipeline import set_tf32

    assert TrainConfig().tf32 is True
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the newer API reads the same
        set_tf32(torch.device("cpu"), False)
        assert torch.backends.cuda.matmul.allow_tf32  # untouched on a CPU
        set_tf32(torch.device("cuda", 0), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
