"""No config key is silently ignored: every key of every stage (teacher, pretrain for each method,
finetune, segfinetune), set to another valid value, changes something a tiny run shows (its losses, learning
rates, final weights or end-of-run metrics), except the keys of :data:`ALLOWED`, each with the
reason it cannot show in a tiny CPU run and where it is tested instead.

Each run goes through the command line (``mimco teacher | pretrain | finetune | segfinetune``), so what a key
does anywhere between the config and the last step counts."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import pytest

import examples.simsiam  # noqa: F401  (registers a second stage-1 method: method=simsiam)
from mimco.cli.main import main
from mimco.config import FinetuneConfig, PretrainConfig, SegmentationConfig, TeacherStageConfig, all_keys, stage_class
from mimco.runs import load_checkpoint

pytestmark = pytest.mark.slow

#: keys that cannot show in a tiny CPU run, and why (and where they are tested); ``stage:key`` for one stage
ALLOWED: dict[str, str] = {
    "data.root": "a path: where an image folder is (the folder runs below set it)",
    "data.download": "only when the files are missing (tests/data/test_data.py)",
    "data.max_bad_fraction": "only with unreadable files (tests/data/test_data.py)",
    "data.num_workers": "loader processes: the same batches by design (tests/data/test_data.py)",
    "data.on_device": "on the CPU the device is the host: the same batches by design (tests/data/test_stream.py)",
    "data.decode": "gpu decodes JPEG folders for pre-training (tests/data/test_device_decode.py)",
    "data.val_root": "a path: the evaluation split of shards or a Hugging Face dataset (tests/data/test_hf.py)",
    "data.shuffle_buffer": "shards only: a shard-local order (tests/data/test_shards.py)",
    "data.image_column": "Hugging Face datasets only (tests/data/test_hf.py)",
    "data.label_column": "Hugging Face datasets only (tests/data/test_hf.py)",
    "teacher:data.labels_per_class": "fine-tuning only; refused here (tests/test_config_rules.py)",
    "teacher:data.labels_fraction": "fine-tuning only; refused here (tests/test_config_rules.py)",
    "teacher:data.label_seed": "with few labels only, which are for fine-tuning",
    "pretrain:data.labels_per_class": "fine-tuning only; refused here (tests/test_config_rules.py)",
    "pretrain:data.labels_fraction": "fine-tuning only; refused here (tests/test_config_rules.py)",
    "pretrain:data.label_seed": "with few labels only, which are for fine-tuning",
    "train.out_dir": "a path",
    "train.name": "a folder name",
    "train.device": "cuda needs a GPU (benchmarks/gpu_check.sh)",
    "train.tf32": "CUDA matmuls only (benchmarks/gpu_check.sh)",
    "train.grad_checkpointing": "recomputes the same activations: the same numbers (tests/engine/test_engine.py)",
    "train.compile": "the same numbers by design (tests/engine/test_compiling.py, tests/methods/test_new_method.py)",
    "train.compile_mode": "only with train.compile (benchmarks/gpu_check.sh)",
    "train.strategy": "fsdp shards across processes under torchrun (tests/engine/test_distributed.py)",
    "train.init_distributed": "a process group of one: the same numbers (benchmarks/gpu_check.sh)",
    "train.dist_timeout_minutes": "how long a collective may wait: the same numbers (tests/engine/test_distributed.py)",
    "train.threads": "CPU threads: the same numbers",
    "train.ckpt_every": "checkpoint cadence (tests/engine/test_engine.py)",
    "train.progress": "the progress bar",
    "train.keep_every_epochs": "snapshots beside last.pt: the same run (tests/engine/test_snapshots.py)",
    "train.keep_last": "how many snapshots stay (tests/engine/test_snapshots.py)",
    "train.tensorboard": "event files beside log.csv, the same run (tests/engine/test_logs.py)",
    "train.wandb": "needs the wandb package (tests/engine/test_logs.py, with a stand-in module)",
    "model.init_from": "a path: the weights a run starts from (tests/models/test_init_from.py)",
    "eval.every_epochs": "the k-NN monitor, scored beside the run (tests/eval/test_monitor.py)",
    "eval.every_steps": "the k-NN monitor, scored beside the run (tests/eval/test_monitor.py)",
    "eval.monitor_train": "the k-NN monitor's subsets (tests/eval/test_monitor.py)",
    "eval.monitor_test": "the k-NN monitor's subsets (tests/eval/test_monitor.py)",
    "eval.monitor_seed": "the k-NN monitor's subsets (tests/eval/test_monitor.py)",
    "eval.few_per_class": "the demo's and the study's few-label columns (tests/cli/test_demo.py)",
    "eval.few_label_seeds": "the demo's and the study's few-label columns (tests/cli/test_demo.py)",
    "eval.few_knn_k": "the demo's and the study's few-label columns (tests/cli/test_demo.py)",
    "finetune:method": "the only fine-tuning method",
    "segfinetune:method": "the only segmentation fine-tuning method",
    "segfinetune:data.name": "segmentation data: fmnist_scenes here, segfolder in tests/data/test_segmentation.py",
    "segfinetune:data.channels": "the backbone's channel count; another is refused (tests/eval/test_commands.py)",
    "segfinetune:data.cache": "(image, mask) pairs: scenes made in memory, folders read pair by pair",
    "segfinetune:data.cache_size": "with data.cache only, which segmentation data do not take",
    "segfinetune:data.procedural_size": "procedural images have no masks",
    "segfinetune:data.labels_per_class": "classification fine-tuning only; refused here (tests/test_config_rules.py)",
    "segfinetune:data.labels_fraction": "classification fine-tuning only; refused here (tests/test_config_rules.py)",
    "segfinetune:data.label_seed": "with few labels only, which are for classification fine-tuning",
    "segfinetune:seg.num_classes": "plain-layout folders only (tests/data/test_segmentation.py)",
    "segfinetune:seg.ignore_index": "plain-layout folders only (tests/data/test_segmentation.py)",
    "segfinetune:head.num_heads": "a mimco checkpoint records its heads: another count is refused (test_formats.py)",
    "pretrain:teacher.model": "a timm name to load a released file into (tests/models/test_families.py)",
    "pretrain:teacher.num_heads": "a mimco teacher records its heads: another count is refused (test_formats.py)",
    "finetune:data.channels": "the backbone's channel count; another is refused (tests/eval/test_commands.py)",
    "finetune:classifier.num_heads": "a mimco checkpoint records its heads: another count is refused (test_formats.py)",
}

#: alternatives where the automatic one (below) would not be valid or would not differ
EXPLICIT: dict[str, str] = {
    "data.name": "fashion_mnist", "data.img_size": "24", "data.channels": "1", "data.mean": "[0.4,0.4,0.4]",
    "data.std": "[0.3,0.3,0.3]", "data.subset": "32", "data.cache": "true", "model.arch": "vit_mini",
    "model.patch_size": "8", "model.embed_dim": "48", "model.depth": "1", "model.num_heads": "4",
    "model.pos_embed": "sincos", "aug.ratio": "[0.5,2.0]", "aug.blur_sigma": "[0.5,1.0]", "aug.max_scale": "0.8",
    "aug.auto_augment": "rand-m5-mstd0.5", "optim.betas": "[0.8,0.9]", "optim.batch_size": "16",
    "optim.accum_steps": "2", "optim.micro_batch": "8", "optim.clip_grad": "0.01", "optim.min_lr": "5e-4",
    "optim.epochs": "2", "optim.warmup_epochs": "0.5", "mask.mask_patch_size": "8", "teacher.mean": "[0.5,0.5,0.5]",
    "teacher.std": "[0.2,0.2,0.2]", "teacher.layers": "[0]", "loss.patch_weight": "0", "loss.image_weight": "0",
    "moco.momentum": "0.5", "eval.knn_k": "3", "eval.knn_temperature": "10", "classifier.encoder": "base",
    "teacher.img_size": "32", "data.labels_fraction": "0.5", "eval.protocols": "[knn,linear]",
    "seg.items": "[1,2]", "head.encoder": "base",
}
METHODS = {"teacher": "simsiam", "pretrain": "simmim"}


def _hint(cls: type, key: str) -> typing.Any:
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def alternative(stage: str, cls: type, key: str) -> str:
    """Another valid value of ``key``: the explicit one, or flipped / another choice / scaled."""
    if key == "method":
        return METHODS[stage]
    if key in EXPLICIT:
        return EXPLICIT[key]
    default = dataclasses.asdict(cls())
    for part in key.split("."):
        default = default[part]
    hint = _hint(cls, key)
    if hint is bool:
        return str(not default).lower()
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != default)
    if hint is float:
        return str(default / 2 if default else 0.1)
    if hint is int:
        return str(default * 2 if default else 1)
    raise AssertionError(f"no alternative for {key} ({hint}); add one to EXPLICIT")


RUN = ["data.name=procedural", "data.img_size=16", "data.procedural_size=128", "data.subset=64", "optim.batch_size=32",
       "optim.epochs=1", "optim.warmup_epochs=0", "optim.base_lr=1e-3", "train.progress=false", "train.log_every=1",
       "train.threads=1"]
MODEL = ["model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
EXTRA = {"teacher": [*MODEL, "moco.mlp_dim=64", "moco.proj_dim=32", "eval.at_end=true", "eval.knn_k=5"],
         "pretrain": [*MODEL, "loss.head_hidden_dim=64", "eval.at_end=true", "eval.knn_k=5"],
         "finetune": ["aug.mixup=0.8", "aug.reprob=0.25"],
         # 28-px Fashion-MNIST scenes (7x7 patches of 4), 32 to train on, 16 to score
         "segfinetune": ["data.name=fmnist_scenes", "data.img_size=28", "seg.scenes=32", "seg.val_scenes=16",
                         "optim.batch_size=8", "data.num_workers=0"]}


def observe(stage: str, out: Path, name: str, overrides: list[str], checkpoint: Path | None = None) -> dict:
    """Train ``stage`` with ``overrides`` through the CLI; what the run shows."""
    head = [stage] if stage in ("teacher", "pretrain") else [stage, str(checkpoint)]
    args = [*head, *RUN, *EXTRA[stage], *overrides, f"train.out_dir={out}", f"train.name={name}"]
    if stage == "pretrain":
        args.insert(1, f"teacher.checkpoint={checkpoint}")
    assert main(args) == 0, args
    run = out / name
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = load_checkpoint(run / "last.pt")["model"]
    digest = hashlib.sha256()
    for k in sorted(model):
        digest.update(k.encode() + model[k].float().numpy().tobytes())
    summary = json.loads((run / "summary.json").read_text())
    return {"loss": [r["loss"] for r in rows], "lr": [r["lr"] for r in rows], "weights": digest.hexdigest(),
            "metrics": {k: v for k, v in summary.items()
                        if ("top" in k or "knn" in k or "miou" in k) and not k.endswith("seconds")}}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny MoCo v3 teachers (different seeds) for stage 2 and fine-tuning."""
    out = tmp_path_factory.mktemp("teachers")
    for seed in (0, 1):
        observe("teacher", out, f"t{seed}", [f"train.seed={seed}"])
    return out / "t0" / "last.pt", out / "t1" / "last.pt"


#: keys that act only together with others: (stage, key=value, what both runs share)
CONTEXT = [
    ("teacher", "model.arch=vit_mini", ["model.embed_dim=0", "model.depth=0", "model.num_heads=0"]),
    ("pretrain", "model.arch=vit_mini", ["model.embed_dim=0", "model.depth=0", "model.num_heads=0"]),
    ("teacher", "aug.blur_prob1=0.5", ["data.img_size=32"]),  # at 16 px MoCo's kernel (10 % of the side) is 1 px
    ("teacher", "aug.blur_prob2=0.9", ["data.img_size=32"]),
    ("teacher", "aug.blur_sigma=[0.5,1.0]", ["data.img_size=32"]),
    ("pretrain", "teacher.mean=[0.5,0.5,0.5] teacher.std=[0.2,0.2,0.2]", []),
    ("teacher", "data.cache_size=12", ["data.cache=true"]),
    ("pretrain", "data.cache_size=12", ["data.cache=true"]),
    ("finetune", "data.cache_size=12", ["data.cache=true"]),
    ("pretrain", "loss.patch_max_negatives=8", ["loss.patch_negatives=batch"]),
    ("pretrain", "loss.centre_momentum=0.5", ["loss.target_centring=position"]),
    ("pretrain", "mask.min_block_patches=2", ["mask.type=block"]),
    ("pretrain", "mask.min_aspect=0.9", ["mask.type=block"]),
    ("pretrain", "teacher.resample=bilinear", ["teacher.img_size=32"]),
    ("pretrain", "teacher.checkpoint=T1", []),
    ("finetune", "aug.color_jitter=0.1", ["aug.auto_augment="]),
    ("finetune", "data.labels_per_class=4", ["optim.batch_size=8"]),
    ("finetune", "data.labels_fraction=0.5", ["optim.batch_size=8"]),
    ("finetune", "data.label_seed=1", ["data.labels_per_class=4", "optim.batch_size=8"]),
    ("segfinetune", "data.img_size=32", []),  # scenes need at least 28 px (one whole item)
    ("segfinetune", "data.subset=16", []),  # the default alternative, 32, is all 32 scenes
    ("segfinetune", "optim.micro_batch=4", []),  # its batch is 8
]
#: each stage with its default method's own sections (MoCo v3's moco, MimCo's teacher and loss)
CLASSES = {"teacher": stage_class(TeacherStageConfig, "mocov3"), "pretrain": stage_class(PretrainConfig, "mimco"),
           "finetune": FinetuneConfig, "segfinetune": SegmentationConfig}



def _keys(stage: str, cls: type) -> list[str]:
    """The keys of ``stage`` tested on their own: not allowed, not in a context run."""
    in_context = {o.split("=")[0] for s, c, _ in CONTEXT if s == stage for o in c.split(" ")}
    return [k for k in all_keys(cls) if k not in ALLOWED and f"{stage}:{k}" not in ALLOWED and k not in in_context]


CASES = [(stage, f"{k}={alternative(stage, cls, k)}", []) for stage, cls in CLASSES.items() for k in _keys(stage, cls)]


def test_the_allow_list_names_real_keys():
    keys = {f"{s}:{k}" for s,
            cls in CLASSES.items() for k in all_keys(cls)} | {k for cls in CLASSES.values() for k in all_keys(cls)}
    assert set(ALLOWED) <= keys and all(reason for reason in ALLOWED.values())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A labelled image folder (train/ and val/, 20-px PNGs) for the keys that act on image folders."""
    from PIL import Image

    from mimco.data.procedural import make_shapes

    root = tmp_path_factory.mktemp("folder")
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = make_shapes(48, 20, seed=seed)
        for i, (x, y) in enumerate(zip(images, labels)):
            d = root / split / f"c{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.transpose(1, 2, 0)).save(d / f"{i}.png")
    return root


_BASELINES: dict[tuple[str, tuple[str, ...]], dict] = {}


def baseline(stage: str, context: list[str], out: Path, checkpoint: Path) -> dict:
    """The run without the change, once per (stage, context); run twice the first time, to show the
    runs are deterministic (so a difference comes from the key alone)."""
    key = (stage, tuple(context))
    if key not in _BASELINES:
        first = observe(stage, out, "base", context, checkpoint)
        assert observe(stage, out, "again", context, checkpoint) == first, f"{stage} {context}: not deterministic"
        _BASELINES[key] = first
    return _BASELINES[key]


@pytest.mark.parametrize("stage,change,context", [*CASES, *CONTEXT], ids=[f"{s}:{c}" for s, c, _ in [*CASES, *CONTEXT]])
def test_every_key_changes_what_a_run_shows(stage, change, context, teachers, folder, tmp_path):
    t0, t1 = teachers
    change = change.replace("T1", str(t1))
    if change.startswith("data.cache") or "data.cache=true" in context:  # image folders only
        context = [*context, "data.name=imagefolder", f"data.root={folder}", "data.subset=0", "data.num_workers=0"]
    base = baseline(stage, context, tmp_path, t0)
    changed = observe(stage, tmp_path, "changed", [*context, *change.split(" ")], t0)
    assert changed != base, f"{stage}: {change} changed nothing a run shows"
