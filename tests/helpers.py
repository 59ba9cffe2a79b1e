"""What several test modules share: tiny configs on the procedural dataset (so every test runs in
seconds), subprocess settings, and builders of foreign checkpoint files and folders. Fixtures live
in ``conftest.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from mimco.config import PretrainConfig, TeacherStageConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
#: subprocesses run the checkout's code, one thread each (two processes share the machine's cores)
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
#: seconds a test waits for a subprocess: a guard against a hang, not a speed budget (a machine loaded
#: by other jobs may run ten times slower; no test's verdict depends on its speed)
HANG = 3600
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

TINY_MODEL = ["model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
TINY_DATA = ["data.name=procedural", "data.img_size=16", "data.procedural_size=256"]
TINY_RUN = ["optim.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0.25", "optim.base_lr=1e-3",
            "train.progress=false", "train.log_every=2", "eval.at_end=false"]


def tiny_overrides(out: Path, name: str) -> list[str]:
    return [*TINY_DATA, *TINY_MODEL, *TINY_RUN, f"train.out_dir={out}", f"train.name={name}"]


def tiny_teacher_cfg(out: Path, name: str = "teacher", extra: tuple[str, ...] = ()) -> TeacherStageConfig:
    return load_config(TeacherStageConfig, None,
                       [*tiny_overrides(out, name), "moco.mlp_dim=64", "moco.proj_dim=32", *extra])


def tiny_pretrain_cfg(out: Path, teacher_ckpt: Path, name: str = "student",
                      extra: tuple[str, ...] = ()) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*tiny_overrides(out, name), f"teacher.checkpoint={teacher_ckpt}",
                                              "loss.head_hidden_dim=64", *extra])


#: each stage's toy-size keys beyond the data and the model
STAGE_EXTRA = {"teacher": ["moco.mlp_dim=64", "moco.proj_dim=32"], "pretrain": ["loss.head_hidden_dim=32"]}


def registered(stage: str, name: str, teacher: Path | None = None, extra: tuple[str, ...] = ()) -> torch.nn.Module:
    """The registered method ``name`` of ``stage`` at toy size on the CPU, built as its stage builds it
    (:mod:`mimco.methods.registry`); stage-2 methods take ``teacher`` (a checkpoint) as their teacher."""
    from mimco.methods import get_method
    from mimco.pipeline import STAGE_CONFIGS

    over = [*TINY_DATA, *TINY_MODEL, f"method={name}", *STAGE_EXTRA[stage], *extra]
    if stage == "pretrain" and teacher is not None:
        over.append(f"teacher.checkpoint={teacher}")
    cfg = load_config(STAGE_CONFIGS[stage], None, over)
    return get_method(name, stage).build(cfg, torch.device("cpu"))


def registered_names() -> list[tuple[str, str]]:
    """(stage, name) of every registered pre-training method (fine-tuning's builder needs a backbone)."""
    from mimco.methods import method_names

    return [(stage, name) for stage in ("teacher", "pretrain") for name in method_names(stage)]


#: a monitored run: k-NN monitor every epoch on fixed subsets, a snapshot every epoch (two kept), TensorBoard
MONITORED = ("optim.epochs=3", "eval.every_epochs=1", "eval.monitor_train=64", "eval.monitor_test=32",
             "train.keep_every_epochs=1", "train.keep_last=2", "train.tensorboard=true")



W = 64  # width of the shrunken foreign-family test models (1 head of 64)


def dinov2_hub_file(path, regs: int = 0) -> None:
    """``dinov2_vits14[_reg4]_pretrain.pth``: a bare state dict in the DINOv2 repository's names
    (``register_tokens``, ``mask_token`` (1, D), the position table with its CLS slot)."""
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2", pretrained=False,
                          num_classes=0, img_size=42, embed_dim=W, depth=2, num_heads=1)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for k in [k for k in sd if k.endswith("ls1.gamma") or k.endswith("ls2.gamma")]:
        sd[k] = torch.randn_like(sd[k])  # LayerScale starts at 1e-5: random values make it count
    if regs:  # timm keeps no CLS slot in the table; the hub file does
        cls_pos = torch.randn(1, 1, W)
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.randn(1, W)
    torch.save(sd, path)


def clip_file(path, prefix: str = "visual.") -> torch.nn.Module:
    """An OpenCLIP / OpenAI CLIP state dict: ``visual.*`` tower (conv1, class_embedding,
    positional_embedding, ln_pre, transformer.resblocks, ln_post, proj) and the text tower."""
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=32, img_size=32, embed_dim=W,
                          depth=2, num_heads=1)
    t = m.state_dict()
    sd = {"conv1.weight": t["patch_embed.proj.weight"], "class_embedding": t["cls_token"][0, 0],
          "positional_embedding": t["pos_embed"][0], "proj": t["head.weight"].T.contiguous()}
    for a, b in (("ln_pre", "norm_pre"), ("ln_post", "norm")):
        sd.update({f"{a}.weight": t[f"{b}.weight"], f"{a}.bias": t[f"{b}.bias"]})
    for i in range(2):
        for a, b in (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2")):
            sd.update({f"transformer.resblocks.{i}.{a}.{p}": t[f"blocks.{i}.{b}.{p}"] for p in ("weight", "bias")})
        sd[f"transformer.resblocks.{i}.attn.in_proj_weight"] = t[f"blocks.{i}.attn.qkv.weight"]
        sd[f"transformer.resblocks.{i}.attn.in_proj_bias"] = t[f"blocks.{i}.attn.qkv.bias"]
    full = {prefix + k: v for k, v in sd.items()}
    full.update({"token_embedding.weight": torch.randn(100, W), "positional_embedding": torch.randn(77, W),
                 "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * W, W), "ln_final.weight": torch.ones(W),
                 "text_projection": torch.randn(W, 32), "logit_scale": torch.tensor(4.6)})
    torch.save(full, path)
    return m


def eva02_file(path) -> None:
    """An EVA-02 MIM checkpoint in the EVA repository's names: q_proj / q_bias / v_bias, SwiGLU
    ``mlp.w1/w2/w3`` with ``ffn_ln``, the final ``norm``, plus ``mask_token``, ``lm_head`` and rope buffers."""
    torch.manual_seed(0)
    m = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=0, img_size=28, depth=1)
    sd = {}
    for k, v in m.state_dict().items():
        for a, b in (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.fc1_g", "mlp.w1"),
                     ("mlp.fc1_x", "mlp.w2"), ("mlp.norm", "mlp.ffn_ln"), ("mlp.fc2", "mlp.w3"), ("fc_norm", "norm")):
            k = k.replace(a, b)
        sd[k] = v.clone() + 0.01 * torch.randn_like(v)
    sd.update({"mask_token": torch.zeros(1, 1, 768), "lm_head.weight": torch.randn(16, 768),
               "lm_head.bias": torch.zeros(16), "rope.freqs_cos": torch.randn(4, 64),
               "rope.freqs_sin": torch.randn(4, 64)})
    torch.save({"model": sd}, path)


def deit_hub_folder(folder: Path, depth: int = 2) -> torch.nn.Module:
    """A Hugging Face hub folder of a timm model (``model.safetensors`` + ``config.json`` with its
    own statistics 0.4 / 0.3 and 32-px input): a distilled DeiT-tiny of ``depth`` blocks; returns it."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=depth)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "deit_tiny_distilled_patch16_224", "num_classes": 1000,
        "model_args": {"img_size": 32, "depth": depth},
        "pretrained_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3], "input_size": [3, 32, 32]}}))
    return m


def messy_folder(root: Path) -> None:
    """20 RGB JPEGs, grey, RGBA, palette, 16-bit and tiny PNGs, a zero-byte and a non-image .jpg, a .txt."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = lambda s: (rng.random((s, s, 3)) * 255).astype(np.uint8)  # noqa: E731
    for i in range(20):
        Image.fromarray(rgb(24)).save(root / f"rgb{i}.jpg")
    Image.fromarray(rgb(24)).convert("L").save(root / "grey.png")
    Image.fromarray(rgb(24)).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(rgb(24)).convert("P").save(root / "palette.png")
    Image.fromarray((rng.random((24, 24)) * 65535).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rgb(6)).save(root / "tiny.png")  # smaller than the 16 px crop: upsampled
    (root / "empty.jpg").write_bytes(b"")  # zero bytes: skipped and counted
    (root / "text.jpg").write_text("not a jpeg")  # not an image despite its name: skipped and counted
    (root / "notes.txt").write_text("ignored: not an image extension")


def tiny_mimco(teacher_dim: int = 48, **loss) -> torch.nn.Module:
    """A MimCo with a random 1-block teacher of width ``teacher_dim`` (no checkpoint), for unit tests."""
    from mimco.config import ModelConfig
    from mimco.masking import MaskGenerator
    from mimco.methods.mimco import MimCo, MimcoLossConfig
    from mimco.models import MaskedViT, create_vit

    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16, 3))
    teacher = create_vit(ModelConfig(patch_size=4, embed_dim=teacher_dim, depth=1, num_heads=2), 16, 3)
    cfg = MimcoLossConfig(head_hidden_dim=32, **loss)
    return MimCo(student, teacher, cfg, MaskGenerator("random", 0.5, (4, 4), seed=0))


def seg_folder(root: Path, n: int = 16, classes: int = 3, size: int = 20, ignore: int = 255) -> Path:
    """A plain-layout segmentation folder (``{train,val}/images/*.png`` + ``masks/*.png``): each image
    holds up to ``classes - 1`` coloured rectangles (class c drawn in colour c) on a grey
    background (class 0), a one-pixel border of ``ignore``."""
    g = np.random.default_rng(0)
    colours = np.array([(90, 90, 90), (220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 220, 40)], np.uint8)
    for split, count in (("train", n), ("val", max(n // 2, 2))):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            for c in range(1, classes):
                h, w = g.integers(4, size // 2, size=2)
                top, left = g.integers(0, size - h), g.integers(0, size - w)
                mask[top : top + h, left : left + w] = c
            image = colours[mask % len(colours)]
            mask[0, :] = ignore
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:03d}.png")
    return root
