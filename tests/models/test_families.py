"""Teachers of other families, each rebuilt with random weights in exactly its released key layout:
mimco's model must give the features of the timm model that timm's own loader builds from the
same file (``pretrained_cfg_overlay=dict(file=...)``), the independent reference."""


import pytest
import timm
import torch
from safetensors.torch import save_file

from mimco.cli.main import main
from mimco.errors import MimcoError
from mimco.models.formats import load_backbone
from tests.helpers import W, clip_file, deit_hub_folder, dinov2_hub_file, eva02_file


def timm_loaded(name: str, path, **kw) -> torch.nn.Module:
    """timm's own reading of a released file (its loader and converter, not mimco's)."""
    overlay = dict(file=str(path), num_classes=kw.get("num_classes", 0))  # keeps a projection head of that width
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw).eval()


def features(model: torch.nn.Module, img: int, chans: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, chans, img, img)
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.mark.parametrize("regs", [0, 4])
def test_dinov2_hub_file(tmp_path, regs):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    dinov2_hub_file(path, regs)
    model, state = load_backbone(str(path))
    assert state.kind == "dinov2" and model.num_prefix_tokens == 1 + regs
    name = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    ref = timm_loaded(name, path, num_classes=0, img_size=42, embed_dim=W, depth=2, num_heads=1)
    assert torch.allclose(features(model, 42), features(ref, 42), atol=1e-5)
    # at another resolution: the position table is resampled the way timm does it
    model70, _ = load_backbone(str(path), img_size=70)
    ref70 = timm_loaded(name, path, num_classes=0, img_size=70, embed_dim=W, depth=2, num_heads=1)
    assert torch.allclose(features(model70, 70), features(ref70, 70), atol=1e-5)


@pytest.mark.parametrize("prefix", ["visual.", "module.visual."])
def test_openclip_visual_tower(tmp_path, prefix):
    path = tmp_path / "open_clip_pytorch_model.bin"
    clip_file(path, prefix)
    model, state = load_backbone(str(path))
    assert state.kind == "clip" and state.stats[0][0] == pytest.approx(0.48145466)  # CLIP's own statistics
    assert "token_embedding.*" in state.ignored  # the text tower is left out, and said so
    ref = timm_loaded("vit_base_patch16_clip_224", path, num_classes=32, img_size=32, embed_dim=W, depth=2, num_heads=1)
    assert torch.allclose(features(model, 32), features(ref, 32), atol=1e-5)
    with torch.no_grad():  # the image projection is kept: CLIP's image embedding
        assert torch.allclose(model.forward_head(features(model, 32)), ref.forward_head(features(ref, 32)), atol=1e-5)


def test_eva02_checkpoint(tmp_path):
    path = tmp_path / "eva02_B_pt_in21k_p14.pt"
    eva02_file(path)
    model, state = load_backbone(str(path))
    assert state.kind == "eva02" and type(model).__name__ == "Eva"
    ref = timm_loaded("eva02_base_patch14_224", path, num_classes=0, img_size=28, depth=1)
    assert torch.allclose(features(model, 28), features(ref, 28), atol=1e-5)


def test_hub_folder_and_timm_names(tmp_path):
    folder = tmp_path / "deit_tiny"
    m = deit_hub_folder(folder, depth=2)
    model, state = load_backbone(str(folder))
    assert state.kind == "hf_timm" and model.num_prefix_tokens == 2  # CLS and distillation tokens
    assert state.stats == ([0.4, 0.4, 0.4], [0.3, 0.3, 0.3])
    assert isinstance(model.head, torch.nn.Identity)  # a classifier is not a projector
    assert torch.allclose(features(model, 32), features(m, 32), atol=1e-6)
    # a timm name with a plain state dict: the file must hold that architecture
    torch.save(m.state_dict(), tmp_path / "deit2.pth")
    with pytest.raises(MimcoError, match=r"missing \['blocks.10.attn.proj.bias'"):
        load_backbone(str(tmp_path / "deit2.pth"), model_name="deit_tiny_distilled_patch16_224", img_size=32)
    full = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=48)
    torch.save(full.state_dict(), tmp_path / "deit.pth")
    named, state = load_backbone(str(tmp_path / "deit.pth"), model_name="deit_tiny_distilled_patch16_224", img_size=48)
    assert state.stats == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # timm's pretrained statistics for that name
    assert torch.allclose(features(named, 48), features(full, 48), atol=1e-6)


def test_bad_teacher_names_and_files(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "x.pth")
    with pytest.raises(MimcoError, match="did you mean vit_small_patch14_dinov2"):
        load_backbone(str(tmp_path / "x.pth"), model_name="vit_smal_patch14_dinov2")
    with pytest.raises(MimcoError, match="not a ViT-family model"):
        load_backbone(str(tmp_path / "x.pth"), model_name="resnet18")
    path = tmp_path / "dinov2.pth"
    dinov2_hub_file(path)
    with pytest.raises(MimcoError, match="patch size 14 but teacher.model=vit_tiny_patch16_224 has 16"):
        load_backbone(str(path), model_name="vit_tiny_patch16_224")
    with pytest.raises(MimcoError,
                       match=r"shapes differ \(file vs model\) for \['cls_token \(1, 1, 64\) vs \(1, 1, 384\)'"):
        load_backbone(str(path), model_name="vit_small_patch14_dinov2")
    torch.save({"visual.class_embedding": torch.zeros(W), "visual.conv1.weight": torch.zeros(W, 3, 16, 16),
                "visual.positional_embedding": torch.zeros(5, W), "visual.transformer.resblocks.0.mlp.c_fc.weight":
                torch.zeros(4 * W, W)}, tmp_path / "clip_broken.pt")
    with pytest.raises(MimcoError, match="do not fit a OpenCLIP / OpenAI CLIP visual tower.*missing"):
        load_backbone(str(tmp_path / "clip_broken.pt"))
    torch.save({"visual.class_embedding": torch.zeros(W)}, tmp_path / "clip_stub.pt")
    with pytest.raises(MimcoError,
                       match=r"key 'visual.conv1.weight' is missing; closest known layout: OpenCLIP .* \(1 of 7"):
        load_backbone(str(tmp_path / "clip_stub.pt"))
    # the keys of no layout: the closest one is named with what it lacks
    sd = {k.replace("attn.qkv", "attn.qkv_fused"): v for k, v in
          timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1).state_dict().items()}
    del sd["patch_embed.proj.weight"]
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(MimcoError, match=r"closest known layout: timm ViT / DINO backbone \(5 of 7 identifying keys\); "
                                         r"missing \['patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'\]; "
                                         r"unexpected \['blocks.N.attn.qkv_fused.bias', "
                                         r"'blocks.N.attn.qkv_fused.weight'\]$"):
        load_backbone(str(tmp_path / "odd.pth"))


def test_inspect_names_each_family(tmp_path, capsys):
    dinov2_hub_file(tmp_path / "d.pth", regs=4)
    clip_file(tmp_path / "c.bin")
    eva02_file(tmp_path / "e.pt")
    for f, words in (("d.pth", ["DINOv2 hub backbone", "4 registers", "mean [0.485"]),
                     ("c.bin", ["OpenCLIP", "image projection to 32", "token_embedding.* (1)"]),
                     ("e.pt", ["EVA-02 checkpoint", "Eva", "width 768, depth 1", "mean [0.4815"])):
        assert main(["inspect", str(tmp_path / f)]) == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), out


def test_an_eva_teacher_is_evaluated_and_a_family_file_is_not_exported(tmp_path, capsys):
    from mimco.eval.features import features_of

    eva02_file(tmp_path / "eva.pt")
    model, _ = load_backbone(str(tmp_path / "eva.pt"))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.eval().forward_features(x)
        assert torch.allclose(features_of(model, x), tokens[:, 0]) and torch.allclose(features_of(model, x, "mean"),
                                                                                      tokens[:, 1:].mean(1))
    assert main(["export", str(tmp_path / "eva.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "timm reads it as it is" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_timm_files_with_layerscale_and_registers(tmp_path):
    """timm's own DINOv2 weights (``reg_token``, ``ls1.gamma``, a table without prefix slots) read from shapes."""
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=42, embed_dim=W,
                          depth=2, num_heads=1)
    with torch.no_grad():
        for b in m.blocks:
            b.ls1.gamma.normal_()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model, state = load_backbone(str(tmp_path / "model.safetensors"))
    assert state.kind == "timm" and model.num_prefix_tokens == 5
    assert torch.allclose(features(model, 42), features(m, 42), atol=1e-5)
    bigger, _ = load_backbone(str(tmp_path / "model.safetensors"), img_size=70)  # the table resampled, no prefix slots
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, num_classes=0, img_size=70, embed_dim=W,
                            depth=2, num_heads=1, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"),
                                                                              num_classes=0))
    assert torch.allclose(features(bigger, 70), features(ref, 70), atol=1e-4)


def test_a_timm_file_with_registers_exports_to_timm(tmp_path):
    import json as js

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=42, embed_dim=W,
                          depth=2, num_heads=1)
    torch.save(m.state_dict(), tmp_path / "reg.pth")
    assert main(["export", str(tmp_path / "reg.pth"), "--out", str(tmp_path / "out")]) == 0
    cfg = js.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_args"]["reg_tokens"] == 4  # 64 wide: no timm name; model_args (registers included) build it
    back = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert torch.allclose(features(back, 42), features(m, 42), atol=1e-5)
