"""Every released layout of ../shared/CHECKPOINT_FORMATS.md, rebuilt with random weights."""

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from mimco.cli.main import main
from mimco.errors import MimcoError
from mimco.models import MoCoMLP, sincos_pos_embed
from mimco.models.formats import load_backbone

DIM, DEPTH, IMG, PATCH = 384, 2, 32, 16  # ViT-S width, shallow to stay fast


def vit(heads: int, img: int = IMG) -> VisionTransformer:
    return VisionTransformer(img_size=img, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=heads, num_classes=0)


def same_features(model: torch.nn.Module, ref: torch.nn.Module, img: int = IMG) -> bool:
    x = torch.randn(2, 3, img, img)
    model.eval(), ref.eval()
    with torch.no_grad():
        return torch.allclose(model.forward_features(x), ref.forward_features(x), atol=1e-6)


def moco_file(path, img: int = IMG):
    base, mom = vit(12, img), vit(12, img)
    table = sincos_pos_embed(base.patch_embed.grid_size, DIM)
    with torch.no_grad():
        mom.pos_embed.copy_(table)
        base.pos_embed.copy_(table)
    sd = {}
    for name, enc in (("base_encoder", base), ("momentum_encoder", mom)):
        for k, v in enc.state_dict().items():
            sd[f"module.{name}.{k}"] = v
        for k, v in MoCoMLP(3, DIM, 64, 32).state_dict().items():
            sd[f"module.{name}.head.{k}"] = v
    for k, v in MoCoMLP(2, 32, 64, 32).state_dict().items():
        sd[f"module.predictor.{k}"] = v
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                "scaler": {"scale": 65536.0}}, path)
    return base, mom, sd


def test_mocov3_momentum_and_base(tmp_path):
    path = tmp_path / "vit-s-300ep.pth.tar"
    base, mom, sd = moco_file(path)
    model, state = load_backbone(str(path))
    assert state.kind == "mocov3" and model.blocks[0].attn.num_heads == 12
    assert same_features(model, mom)
    assert torch.equal(model.pos_embed, sd["module.momentum_encoder.pos_embed"])  # the stored table, bit for bit
    head = MoCoMLP(3, DIM, 64, 32)
    head.load_state_dict({k[len("module.momentum_encoder.head."):]: v for k, v in sd.items()
                          if k.startswith("module.momentum_encoder.head.")})
    f = torch.randn(4, DIM)
    model.head.eval(), head.eval()
    assert torch.allclose(model.head(f), head(f))
    model_b, _ = load_backbone(str(path), encoder="base")
    assert same_features(model_b, base)
    with pytest.raises(MimcoError, match="trained with 12 heads but the config asks for 6"):
        load_backbone(str(path), num_heads=6)


def test_mocov3_resampled_to_smaller_images(tmp_path):
    path = tmp_path / "vit-s-224.pth.tar"
    _, _, sd = moco_file(path, img=224)
    model, _ = load_backbone(str(path), img_size=32)
    stored = sd["module.momentum_encoder.pos_embed"]
    assert stored.shape == (1, 197, DIM) and model.pos_embed.shape == (1, 5, DIM)
    assert torch.equal(model.pos_embed[:, 0], stored[:, 0])  # CLS slot kept


def test_mocov3_linear_probe_file_is_named(tmp_path):
    sd = {f"module.{k}": v for k, v in vit(12).state_dict().items()}
    sd["module.head.weight"], sd["module.head.bias"] = torch.randn(1000, DIM), torch.zeros(1000)
    torch.save({"epoch": 90, "arch": "vit_small", "state_dict": sd, "best_acc1": 73.2},
               tmp_path / "linear-vit-s-300ep.pth.tar")
    with pytest.raises(MimcoError, match="linear-probe checkpoint.*vit-s-300ep"):
        load_backbone(str(tmp_path / "linear-vit-s-300ep.pth.tar"))


def test_dino_backbone_only_and_full(tmp_path):
    ref = vit(6)
    torch.save(ref.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    model, state = load_backbone(str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    assert state.kind == "timm" and model.blocks[0].attn.num_heads == 6 and same_features(model, ref)

    student, teacher = vit(6), vit(6)
    full = {"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                        "module.head.mlp.0.weight": torch.randn(8, DIM)},
            "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                        "head.mlp.0.weight": torch.randn(8, DIM)},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16), "dino_loss": {"center": torch.zeros(1, 8)}}
    torch.save(full, tmp_path / "dino_full_checkpoint.pth")
    model_t, state = load_backbone(str(tmp_path / "dino_full_checkpoint.pth"))
    assert state.kind == "dino" and same_features(model_t, teacher)
    model_s, _ = load_backbone(str(tmp_path / "dino_full_checkpoint.pth"), encoder="base")
    assert same_features(model_s, student)


def test_mae_and_simmim(tmp_path):
    ref = vit(6)
    mae = {**ref.state_dict(), "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, DIM),
           "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_pred.weight": torch.randn(768, 16)}
    torch.save({"model": mae, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 1.0}, "args": argparse.Namespace(model="mae_vit_small")},
               tmp_path / "mae_pretrain.pth")
    model, state = load_backbone(str(tmp_path / "mae_pretrain.pth"))
    assert state.kind == "mae" and same_features(model, ref)
    assert "decoder_embed.*" in state.ignored and "mask_token" in state.ignored

    simmim = {**{f"encoder.{k}": v for k, v in ref.state_dict().items()}, "encoder.mask_token": torch.zeros(1, 1, DIM),
              "decoder.0.weight": torch.randn(768, DIM, 1, 1)}
    torch.save({"model": simmim}, tmp_path / "simmim.pth")
    model, state = load_backbone(str(tmp_path / "simmim.pth"))
    assert state.kind == "simmim" and same_features(model, ref)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_timm_state_dicts(tmp_path, suffix):
    ref = vit(6)
    sd = {**ref.state_dict(), "head.weight": torch.randn(1000, DIM), "head.bias": torch.zeros(1000)}
    path = tmp_path / f"model{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    model, state = load_backbone(str(path))
    assert state.kind == "timm" and same_features(model, ref) and state.ignored == {"head.*": 2}


def test_missing_keys_name_the_format(tmp_path):
    sd = {f"encoder.{k}": v for k, v in vit(6).state_dict().items() if not k.startswith("blocks.1.mlp")}
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(MimcoError, match=r"looks like a SimMIM checkpoint.*missing \['blocks.1.mlp"):
        load_backbone(str(tmp_path / "broken.pth"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(MimcoError, match="refusing .*could run code"):
        load_backbone(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


def test_export_then_timm_create_model(tmp_path, capsys):
    path = tmp_path / "vit-s-300ep.pth.tar"
    moco_file(path)
    assert main(["export", str(path), "--out", str(tmp_path / "exported")]) == 0
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224"  # a 2-block ViT-S is no timm model: model_args build it
    assert cfg["model_args"]["depth"] == 2 and cfg["model_args"]["num_heads"] == 12  # MoCo v3's 12 heads
    model = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True)
    ours, _ = load_backbone(str(path))
    assert same_features(model, ours)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(model(x), ours.forward_head(ours.forward_features(x), pre_logits=True), atol=1e-6)
    assert "mean/std: ImageNet's (the file records none)" in capsys.readouterr().out
    assert list(cfg["pretrained_cfg"]["mean"]) == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_export_names_a_timm_model_only_when_it_is_that_model():
    from mimco.config import ModelConfig
    from mimco.models import create_vit
    from mimco.models.export import matching_name

    assert matching_name(create_vit(ModelConfig(arch="vit_small"), 224)) == "vit_small_patch16_224"
    assert matching_name(create_vit(ModelConfig(arch="vit_base"), 96)) == "vit_base_patch16_224"  # any image size
    assert matching_name(create_vit(ModelConfig(arch="vit_small", num_heads=12), 224)) is None  # MoCo v3's 12 heads
    assert matching_name(create_vit(ModelConfig(arch="vit_mini", patch_size=7), 28)) is None  # the demo's
    assert matching_name(create_vit(ModelConfig(arch="vit_small", depth=2), 32)) is None


def test_inspect_prints_format_and_arch(tmp_path, capsys):
    path = tmp_path / "vit-s-300ep.pth.tar"
    moco_file(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MoCo v3 pre-training checkpoint" in out and "width 384, depth 2, heads 12, patch 16" in out
    assert "module.base_encoder.* (" in out and "module.predictor.*" in out
    assert main(["inspect", str(tmp_path / "nope.pth")]) == 2
