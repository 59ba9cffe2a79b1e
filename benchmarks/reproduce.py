"""The paper's claims in miniature: MimCo against its teacher, SimMIM and feature regression,
with ablations of the choices docs/method.md marks as ours.

    python benchmarks/reproduce.py --preset smoke            # minutes: checks the machinery
    python benchmarks/reproduce.py --preset cpu              # Fashion-MNIST, 16 tokens, 2 CPU cores
    python benchmarks/reproduce.py --preset gpu              # ViT-Tiny 32 px / patch 4 on one GPU
    python benchmarks/reproduce.py --preset cpu --teachers   # stronger / finer-grid teachers, MimCo vs MaskDistill
    python benchmarks/reproduce.py --preset cpu --dense      # segmentation on Fashion-MNIST scenes (patch level)
    python benchmarks/reproduce.py --preset cpu --remedies   # patch tokens: position or content? (REMEDY_ROWS)

Every run is a normal mimco run folder under OUT/runs/; a finished run (or evaluation) is reused
and an interrupted one resumed, so the study survives interruptions. OUT/results.md and
results.csv hold mean +- std over seeds of k-NN (k = 20), linear-probe and fine-tune top-1;
OUT/tsne.png shows SimMIM, teacher and MimCo (seed 0); OUT/curves.png the training curves.
With --dense, OUT/results-dense.md holds the dense rows: the frozen segmentation probe (mIoU, 3
heads per model) and a short segmentation fine-tune on Fashion-MNIST scenes, beside k-NN and
linear probe, for the teacher, SimMIM, MimCo, patch only, image only and MaskDistill.
With --remedies, OUT/results-remedies.md: the switches that could keep grid position out of the
student's patch tokens, each with the scenes probe at two grids, the token position probe and the
image-level columns (k-NN, linear probe, 10 labels per class).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from timm.models.vision_transformer import VisionTransformer

from mimco.config import (
    FinetuneConfig,
    PretrainConfig,
    SegmentationConfig,
    TeacherStageConfig,
    apply_overrides,
    load_config,
    to_dict,
)
from mimco.data.build import class_names, load_dataset
from mimco.errors import MimcoError
from mimco.eval import extract_features
from mimco.eval.features import eval_batches
from mimco.eval.plots import curves_figure, read_log, tsne_figure
from mimco.eval.probe import probe_backbone, probe_few_labels
from mimco.models.export import timm_kwargs
from mimco.models.formats import load_backbone
from mimco.models.vit import encode
from mimco.pipeline import StageStopped, run_or_reuse, setup
from mimco.runs import CHECKPOINT, CONFIG, LOG, SUMMARY

#: the ablations behind claim 3 (both losses matter; contrastive beats regression): run over every seed
CLAIM_3 = ["patch only", "image only", "L1 regression", "cosine regression"]

#: per preset: overrides of every stage, then per stage; seeds of the main rows; the ablations
#: (seed 0) and which of them run over every seed
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": ["data.name=procedural", "data.img_size=16", "data.procedural_size=256", "data.channels=3"],
        "model": ["model.arch=vit_mini", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                  "model.num_heads=2"],
        "teacher": ["moco.mlp_dim=128", "moco.proj_dim=64", "optim.epochs=2", "optim.warmup_epochs=0.5",
                    "optim.base_lr=2e-3", "optim.batch_size=64"],
        "student": ["optim.epochs=2", "optim.warmup_epochs=0.5", "optim.base_lr=2e-3", "optim.batch_size=64",
                    "loss.head_hidden_dim=64"],
        "finetune": ["optim.epochs=1", "optim.batch_size=64", "optim.warmup_epochs=0.2", "optim.base_lr=1e-3",
                     "data.num_workers=0"],
        "seeds": [0, 1], "ablations": ["patch only", "L1 regression", "block masking"], "seeded": ["patch only"],
        "few": [4, 20], "few_finetune": ["data.labels_per_class=4", "optim.batch_size=8", "optim.epochs=2"],
        # --dense: the scenes (28 px: 7 x 7 patches of 4) and the segmentation fine-tune
        "dense": ["seg.scenes=256", "seg.val_scenes=64", "data.img_size=28"],
        "dense_finetune": ["optim.epochs=1", "optim.batch_size=32", "optim.warmup_epochs=0.2"],
    },
    "cpu": {  # the demo's configuration (16 tokens), see configs/fmnist_*.yaml
        "data": ["data.name=fashion_mnist", "data.img_size=28", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"],
        "model": ["model.arch=vit_mini", "model.patch_size=7", "model.embed_dim=128", "model.depth=4",
                  "model.num_heads=4", "model.pos_embed=sincos"],
        "teacher": ["aug.min_scale=0.2", "moco.mlp_dim=1024", "optim.epochs=3", "optim.warmup_epochs=0.5",
                    "optim.base_lr=2e-3", "optim.weight_decay=0.1"],
        "student": ["optim.epochs=2", "optim.warmup_epochs=0.3", "optim.base_lr=2e-3"],
        # a light recipe, 1 epoch to keep the study within 90 minutes (finetune:optim.epochs=2 adds ~1-2 points);
        # 1 epoch of the full MAE recipe (mixup, cutmix, RandAugment) stays near 50-60 %
        "finetune": ["optim.epochs=1", "optim.batch_size=256", "optim.warmup_epochs=0.2", "optim.base_lr=1e-3",
                     "classifier.layer_decay=0.75", "classifier.drop_path_rate=0", "aug.auto_augment=", "aug.mixup=0",
                     "aug.cutmix=0", "aug.reprob=0", "aug.min_scale=0.8"],
        "seeds": [0, 1, 2], "ablations": "all", "seeded": [],  # --seeded-ablations claim3: +14 min
        # few labels: probes on 10 and 100 labelled images per class (3 subsets each), and a fine-tune from 10 per
        # class (100 images: batch 32, 20 epochs of 3 steps)
        "few": [10, 100], "few_finetune": ["data.labels_per_class=10", "optim.batch_size=32", "optim.epochs=20",
                                           "optim.warmup_epochs=2"],
        # --dense: the demo's scenes (2000 + 500 at 56 px: 8 x 8 patches of 7) and a 5-epoch segmentation fine-tune
        # (155 steps; lr 1e-3 at batch 64)
        "dense": [],
        "dense_finetune": ["optim.epochs=5", "optim.batch_size=64", "optim.warmup_epochs=0.5", "optim.base_lr=4e-3"],
    },
    "gpu": {  # ViT-Tiny at 32 px / patch 4 (64 tokens); data on the device, augmented there
        "data": ["data.name=fashion_mnist", "data.img_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
                 "data.on_device=true", "train.precision=bf16"],
        "model": ["model.arch=vit_tiny", "model.patch_size=4", "model.pos_embed=sincos"],
        # not yet run on a GPU: these epochs are sized from FLOP counts to fit ~8 minutes of one H100, unmeasured
        "teacher": ["aug.min_scale=0.2", "moco.mlp_dim=2048", "optim.epochs=20", "optim.warmup_epochs=2",
                    "optim.base_lr=1.5e-3", "optim.batch_size=512", "optim.weight_decay=0.1"],
        "student": ["optim.epochs=10", "optim.warmup_epochs=1", "optim.base_lr=1.5e-3", "optim.batch_size=512"],
        "finetune": ["optim.epochs=3", "optim.batch_size=512", "optim.warmup_epochs=0.3", "optim.base_lr=1e-3",
                     "classifier.layer_decay=0.75", "classifier.drop_path_rate=0", "aug.auto_augment=", "aug.mixup=0",
                     "aug.cutmix=0", "aug.reprob=0", "aug.min_scale=0.8", "data.num_workers=8", "data.on_device=false",
                     "train.precision=bf16"],
        "seeds": [0, 1, 2], "ablations": "all", "seeded": CLAIM_3,
        "few": [10, 100], "few_finetune": ["data.labels_per_class=10", "optim.batch_size=32", "optim.epochs=20",
                                           "optim.warmup_epochs=2"],
        "dense": ["data.img_size=64"],  # 16 x 16 patches of 4
        "dense_finetune": ["optim.epochs=5", "optim.batch_size=64", "optim.warmup_epochs=0.5", "data.num_workers=8",
                           "train.precision=bf16"],
    },
}

#: raw pixels are a row only up to this many numbers per image (the k-NN bank holds them all)
MAX_PIXEL_FEATURES = 64 * 64 * 3

#: name -> (stage-2 overrides, whether it is a main row evaluated over every seed)
STUDENT_ROWS: dict[str, tuple[list[str], bool]] = {
    "MimCo (patch + image)": ([], True),
    "SimMIM": (["method=simmim"], True),
    "patch only": (["loss.image_weight=0"], False),
    "image only": (["loss.patch_weight=0"], False),
    "L1 regression": (["loss.patch_loss=l1", "loss.image_weight=0"], False),
    "cosine regression": (["loss.patch_loss=cosine", "loss.image_weight=0"], False),
    "mask 0.4": (["mask.ratio=0.4"], False),
    "mask 0.75": (["mask.ratio=0.75"], False),
    "block masking": (["mask.type=block"], False),
    "batch negatives": (["loss.patch_negatives=batch"], False),
    "patch tau 0.1": (["loss.patch_temperature=0.1"], False),
    "patch tau 0.5": (["loss.patch_temperature=0.5"], False),
    "drop near-duplicate negatives (cos > 0.95)": (["loss.patch_neg_threshold=0.95"], False),
    "image target: projector": (["teacher.image_target=projector"], False),
}


#: the teacher study: teacher -> stage-1 overrides on top of the preset's (the student keeps the preset's model)
TEACHERS: dict[str, list[str]] = {
    "MoCo v3 teacher": [],
    "deeper and longer (6 blocks, 4 epochs)": ["model.depth=6", "optim.epochs=4"],
    "patch 4 (a finer grid, resampled onto the student's; 1.5 epochs)": ["model.patch_size=4", "optim.epochs=1.5"],
}
#: the students of each teacher: MimCo's two contrastive losses, and MaskDistill's regression
#: (smooth-L1 on layer-normalised teacher tokens, no image-level loss)
TEACHER_STUDENTS: dict[str, list[str]] = {
    "MimCo": [],
    "MaskDistill": ["loss.patch_loss=smooth_l1", "teacher.target_norm=layernorm", "loss.image_weight=0"],
}

#: the dense study's stage-2 rows (beside the teacher): their overrides; the folders are the main and
#: teacher studies' (MaskDistill is the teacher study's student of the default teacher)
DENSE_ROWS: dict[str, list[str]] = {
    "SimMIM": STUDENT_ROWS["SimMIM"][0],
    "MimCo (patch + image)": [],
    "patch only": STUDENT_ROWS["patch only"][0],
    "image only": STUDENT_ROWS["image only"][0],
    "batch negatives": STUDENT_ROWS["batch negatives"][0],
    "MaskDistill of teacher": TEACHER_STUDENTS["MaskDistill"],
}
#: heads of the frozen segmentation probe per model (mean ± std over them and the model seeds)
DENSE_PROBE_SEEDS = 3

#: the rows that are not stage-2 variants, and their run folders
OTHER_FOLDERS = {"MoCo v3 teacher": "teacher", "MoCo v3, teacher + MimCo compute": "teacher-long",
                 "random-init ViT": "random-init", "raw pixels": "raw-pixels"}


def folder(runs: Path, row: str, seed: int | None = None) -> Path:
    """The run folder of a study row (and seed): the one place names are made."""
    name = OTHER_FOLDERS.get(row) or row.split(" (")[0].replace(" ", "-").replace(":", "").replace(",", "").lower()
    return runs / (name if seed is None else f"{name}-s{seed}")


def _changed(saved: Any, now: Any) -> bool:
    """Whether a key of the saved config has another value now (keys a newer mimco added are not
    in ``saved`` and do not count)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return any(k not in now or _changed(v, now[k]) for k, v in saved.items())
    return saved != now


def train(stage: str, overrides: list[str], run: Path) -> dict[str, Any]:
    """Run, resume or reuse one stage in ``run`` (reuse only when its saved config is the same)."""
    cls = TeacherStageConfig if stage == "teacher" else PretrainConfig
    cfg = load_config(cls, None, [*overrides, f"train.out_dir={run.parent}", f"train.name={run.name}",
                                  "train.progress=false", "eval.at_end=false", "train.ckpt_every=100"])
    if (run / CONFIG).is_file() and _changed(yaml.safe_load((run / CONFIG).read_text()), to_dict(cfg)):
        raise SystemExit(f"{run} was trained with another configuration; use a fresh --out for a changed preset")
    return run_or_reuse(stage, cfg, run, say="reproduce")  # stopped (SIGTERM, Ctrl-C): StageStopped


def _finetune_config(p: dict, run: Path, few: bool = False) -> tuple[FinetuneConfig, str]:
    """The preset's fine-tune config (``few``: from its few labels) and a short hash of it (names its
    folder, keys its cached result)."""
    over = [*[o for o in p["data"] if not o.startswith("train.")], *p["finetune"], *(p["few_finetune"] if few else []),
            "train.progress=false"]
    key = hashlib.sha256(yaml.safe_dump(to_dict(load_config(FinetuneConfig, None, over))).encode()).hexdigest()[:8]
    return load_config(FinetuneConfig, None, [*over, f"train.out_dir={run}", f"train.name=finetune-{key}"]), key


def _finetuned(model: torch.nn.Module, fcfg: FinetuneConfig, run: Path, device: torch.device) -> dict:
    """Fine-tune ``model`` in ``run/<fcfg.train.name>``, or reuse the finished result there."""
    return run_or_reuse("finetune", fcfg, run / fcfg.train.name, say="reproduce", backbone=model)


def evaluate(name: str, model: torch.nn.Module | None, run: Path, p: dict, splits: tuple, do_finetune: bool,
             few: bool = False, few_finetune: bool = True) -> dict:
    """k-NN, linear probe (and fine-tune) of one model; with ``few`` also the few-label block: k-NN
    and linear probe on each of ``p["few"]`` labelled images per class (subsets 0..eval.few_label_seeds-1) and a
    fine-tune from the smallest. Cached in run/eval.json. Each fine-tune config has its own folder
    (finetune-<hash>), so a changed recipe fine-tunes again and a finished one (its summary.json)
    is reused when the recipe comes back."""
    cache = run / "eval.json"
    out = json.loads(cache.read_text()) if cache.is_file() else {}
    fcfg, key = _finetune_config(p, run)
    few_cfg, few_key = _finetune_config(p, run, few=True)
    if out.get("finetune_config") != key:
        out.pop("finetune", None)
    if out.get("few_finetune_config") != few_key:
        out.pop("few_finetune", None)
    want_few = {str(n) for n in p["few"]} if few else set()
    ft_few = few and few_finetune and model is not None
    if ("knn" in out and ("finetune" in out or not do_finetune) and want_few <= set(out.get("few", {}))
            and ("few_finetune" in out or not ft_few)):
        return out
    cfg = load_config(PretrainConfig, None, [*p["data"], *p["model"]])
    device = setup(cfg)
    m = model.to(device) if model is not None else None
    test_feats = None
    if "knn" not in out:
        r = probe_backbone(m, splits, cfg.data, cfg.eval, device, seed=0)
        out.update(knn=r.knn_top1, linear=r.linear_top1, probe_seconds=round(r.seconds, 1))
        test_feats = r.test_features, r.test_labels
    for n in sorted(want_few - set(out.get("few", {})), key=int):
        if test_feats is None:
            test_feats = extract_features(m, splits[1], cfg.data, device)
        res = probe_few_labels(m, splits[0], *test_feats, cfg.data, device, int(n),
                               seeds=tuple(range(cfg.eval.few_label_seeds)), ks=(cfg.eval.few_knn_k,),
                               linear={"seed": 0})
        out.setdefault("few", {})[n] = {"knn": res[f"knn{cfg.eval.few_knn_k}_top1"], "linear": res["linear_top1"]}
    if do_finetune and m is not None and "finetune" not in out:
        res = _finetuned(m, fcfg, run, device)
        out.update(finetune=res["top1"], finetune_config=key, finetune_seconds=res["train_seconds"])
    if ft_few and "few_finetune" not in out:
        res = _finetuned(m, few_cfg, run, device)
        out.update(few_finetune=res["top1"], few_finetune_config=few_key, few_finetune_seconds=res["train_seconds"])
    run.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    print(f"[reproduce] {name}: {out}", file=sys.stderr, flush=True)
    return out


@torch.inference_mode()
def patch_similarity(teacher: torch.nn.Module, dataset: Any, cfg: PretrainConfig, device: torch.device,
                     limit: int = 1000) -> np.ndarray:
    """Cosine similarities between a teacher's patch tokens of the same image (all off-diagonal
    pairs, first ``limit`` images): how alike the same-image negatives of the patch loss are."""
    teacher.eval()
    sims, seen = [], 0
    for x, _ in eval_batches(dataset, cfg.data, 250, device):
        t = F.normalize(encode(teacher, x)[:, teacher.num_prefix_tokens :].float(), dim=-1)
        s = t @ t.transpose(1, 2)
        sims.append(s[:, ~torch.eye(s.shape[1], dtype=torch.bool, device=s.device)].cpu().numpy().ravel())
        seen += len(x)
        if seen >= limit:
            break
    return np.concatenate(sims)


def hazard(runs: Path, s0: int, test: Any, cfg: PretrainConfig, device: torch.device, ablations: list[str]) -> str:
    """The false-negative hazard of same-image patch negatives, in numbers: how alike the
    teacher's patch tokens of one image are, and where each variant's patch loss ends against chance."""
    teacher, _ = load_backbone(str(folder(runs, "MoCo v3 teacher", s0) / CHECKPOINT))
    sim = patch_similarity(teacher.to(device), test, cfg, device)
    n = (cfg.data.img_size // cfg.model.patch_size) ** 2
    lines = [f"Same-image teacher patch tokens (seed-{s0} teacher, {n} tokens, 1000 test images): cosine similarity "
             f"median {np.median(sim):.3f}, 95th percentile {np.quantile(sim, 0.95):.3f}, "
             f"{100 * (sim > 0.95).mean():.1f} % of pairs above 0.95.", "",
             "| patch loss variant | final patch loss | chance (log #candidates) |", "|---|---|---|"]
    for row in ["MimCo (patch + image)", *ablations]:
        over = dict(o.split("=", 1) for o in STUDENT_ROWS[row][0])
        if over.get("loss.patch_loss", "infonce") != "infonce" or over.get("loss.patch_weight") == "0":
            continue
        run = folder(runs, row, s0)
        if not (run / LOG).is_file():
            continue
        if "loss.patch_neg_threshold" in over:
            chance = f"< {math.log(n):.2f} (negatives dropped)"
        elif over.get("loss.patch_negatives") == "batch":
            chance = f"{math.log(n * yaml.safe_load((run / CONFIG).read_text())['optim']['batch_size']):.2f}"
        else:
            chance = f"{math.log(n):.2f}"
        lines.append(f"| {row} | {read_log(run / LOG)['loss_patch'][-1]:.2f} | {chance} |")
    return "\n".join(lines) + "\n"


def _spent(runs: Path) -> str:
    """The measured seconds behind the folder's results, summed from its summaries."""
    train = sum(json.loads(f.read_text())["train_seconds"] for f in runs.glob("*/" + SUMMARY))
    evals = [json.loads(f.read_text()) for f in runs.glob("*/eval.json")]
    probe = sum(e.get("probe_seconds", 0.0) for e in evals)
    tune = sum(e.get("finetune_seconds", 0.0) + e.get("few_finetune_seconds", 0.0) for e in evals)
    untimed = sum("probe_seconds" not in e for e in evals)
    return (f"measured time of the runs: {(train + probe + tune) / 60:.1f} min (pre-training {train / 60:.1f}, "
            f"k-NN + linear probe {probe / 60:.1f}{f' ({untimed} untimed)' if untimed else ''}, fine-tune "
            f"{tune / 60:.1f})")


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--out", help="results folder (default benchmarks/results/reproduce-<preset>)")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")],
                    help="comma-separated seeds of the main rows, e.g. 0,1 (default: the preset's)")
    ap.add_argument("--seeded-ablations", metavar="ROWS",
                    help="comma-separated ablation rows to run over every seed, or 'claim3' for "
                         f"{', '.join(CLAIM_3)} (default: the preset's)")
    ap.add_argument("--ablations", metavar="ROWS",
                    help="comma-separated ablation rows to run (seed 0), 'all', or 'none' for the main rows alone "
                         "(default: the preset's)")
    ap.add_argument("--teachers", action="store_true",
                    help="run the teacher study instead (OUT/results-teachers.md): each teacher of TEACHERS, over the "
                         "seeds, and a MimCo and a MaskDistill student of each")
    ap.add_argument("--dense", action="store_true",
                    help="run the dense study instead (OUT/results-dense.md): segmentation probe and fine-tune on "
                         "Fashion-MNIST scenes of the teacher, SimMIM, MimCo, patch only, image only and MaskDistill")
    ap.add_argument("--remedies", metavar="ROWS", nargs="?", const="all",
                    help="run the remedies study instead (OUT/results-remedies.md): the teacher and the rows of "
                         "REMEDY_ROWS (comma-separated, default all) on the scenes at both grids, token position and "
                         "the image-level columns")
    ap.add_argument("--teacher-seed", type=int,
                    help="with --remedies: every student learns from this seed's teacher (the seeds then vary stage 2 "
                         "alone; default: each seed its own teacher)")
    ap.add_argument("overrides", nargs="*", metavar="[STAGE:]KEY=VALUE",
                    help="config overrides on top of the preset: data.*, model.*, train.* for every stage; "
                         "teacher:KEY=VALUE, student:KEY=VALUE or finetune:KEY=VALUE for one stage")
    return ap


def few_label_table(results: dict[str, list[dict]], order: list[str], p: dict, subsets: int) -> str:
    """The few-label block: per row, mean ± std over every (model seed, label subset) pair."""
    sizes = [str(n) for n in p["few"]]
    rows = [r for r in order if any("few" in v for v in results.get(r, []))]
    if not rows:
        return ""
    cols = [f"{kind} {n}/class" for n in sizes for kind in ("k-NN", "linear")] + [f"fine-tune {sizes[0]}/class"]
    lines = [f"Few labels: k-NN (k = eval.few_knn_k) and linear probe trained on {' and '.join(sizes)} labelled images "
             f"per class ({subsets} label subsets: `mimco knn/linprobe --per-class N --label-seeds {subsets}`), "
             "scored on the whole test split; fine-tune from the first size's subset 0 (`data.labels_per_class`); "
             "mean ± std over model seeds x label subsets.", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        vals = [v for v in results[r] if "few" in v]
        cells = [_stat([x for v in vals for x in v["few"][n][kind]]) for n in sizes for kind in ("knn", "linear")]
        cells.append(_stat([v["few_finetune"] for v in vals if "few_finetune" in v]))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = build_parser().parse_args()
    try:
        p = with_overrides(PRESETS[args.preset], args.overrides)
        p["seeds"] = args.seeds or p["seeds"]
        if args.ablations:
            p["ablations"] = "all" if args.ablations == "all" else [] if args.ablations == "none" else \
                args.ablations.split(",")
            unknown = sorted(set(p["ablations"]) - set(STUDENT_ROWS)) if p["ablations"] != "all" else []
            if unknown:
                raise MimcoError(f"unknown ablation row(s) {unknown}; choose from {sorted(STUDENT_ROWS)}")
        if args.seeded_ablations:
            p["seeded"] = CLAIM_3 if args.seeded_ablations == "claim3" else args.seeded_ablations.split(",")
            unknown = sorted(set(p["seeded"]) - set(STUDENT_ROWS))
            if unknown:
                raise MimcoError(f"unknown ablation row(s) {unknown}; choose from {sorted(STUDENT_ROWS)}")
        out = Path(args.out or Path(__file__).parent / "results" / f"reproduce-{args.preset}")
        if args.teacher_seed is not None and not args.remedies:
            raise MimcoError("--teacher-seed applies to --remedies alone; drop it or add --remedies")
        if args.remedies:
            rows = list(REMEDY_ROWS) if args.remedies == "all" else list(dict.fromkeys(args.remedies.split(",")))
            unknown = sorted(set(rows) - set(REMEDY_ROWS))
            if unknown:
                raise MimcoError(f"unknown remedy row(s) {unknown}; choose from {sorted(REMEDY_ROWS)}")
            p["teacher_seed"] = args.teacher_seed
            remedy_study(args.preset, p, out, rows)
            return
        study = teacher_study if args.teachers else dense_study if args.dense else run_study
        study(args.preset, p, out)
    except StageStopped as e:  # the checkpoint is written; the same command resumes the study
        print(f"error: {e}; the study stops here. Resume it with:\n  python {' '.join(sys.argv)}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except MimcoError as e:
        raise SystemExit(f"error: {e}") from None


def with_overrides(preset: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``preset`` with ``[STAGE:]KEY=VALUE`` overrides appended where they belong."""
    p = {k: list(v) if isinstance(v, list) else v for k, v in preset.items()}
    for o in overrides:
        if "=" not in o:
            raise MimcoError(f"override '{o}' is not KEY=VALUE; write e.g. data.root=/data/fmnist or "
                             "student:mask.ratio=0.4")
        key = o.split("=", 1)[0]
        stage, _, rest = key.rpartition(":")
        if stage:
            if stage not in ("teacher", "student", "finetune", "dense", "dense_finetune"):
                raise MimcoError(f"unknown stage '{stage}' in '{o}'; use teacher:, student:, finetune:, dense: (the "
                                 "scenes) or dense_finetune:")
            p[stage].append(o.split(":", 1)[1])
        elif rest.startswith("model."):
            p["model"].append(o)
        elif rest.startswith(("data.", "train.")):
            p["data"].append(o)
        else:
            raise MimcoError(f"'{o}' is stage-specific; prefix it with teacher:, student: or finetune:")
    return p


def run_study(preset: str, p: dict[str, Any], out: Path) -> None:
    """Train, evaluate and tabulate every row of the study into ``out``."""
    runs = out / "runs"
    start = time.perf_counter()
    base = [*p["data"], *p["model"]]
    cfg = load_config(PretrainConfig, None, base)
    splits = (load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False))
    ablations = [r for r, (_, main_row) in STUDENT_ROWS.items() if not main_row]
    if p["ablations"] != "all":
        ablations = [r for r in ablations if r in p["ablations"]]
    results: dict[str, list[dict]] = {}

    def record(row: str, ckpt: Path, run: Path, do_ft: bool) -> None:
        model, _ = load_backbone(str(ckpt))
        results.setdefault(row, []).append(evaluate(row, model, run, p, splits, do_ft, few=do_ft))

    teacher_epochs = load_config(TeacherStageConfig, None, p["teacher"]).optim.epochs
    for seed in p["seeds"]:
        s = [f"train.seed={seed}"]
        t_run = folder(runs, "MoCo v3 teacher", seed)
        t_sum = train("teacher", [*base, *p["teacher"], *s], t_run)
        record("MoCo v3 teacher", t_run / CHECKPOINT, t_run, True)
        student = [*base, *p["student"], *s, f"teacher.checkpoint={t_run / CHECKPOINT}"]
        extra = ablations if seed == p["seeds"][0] else [r for r in ablations if r in p.get("seeded", [])]
        rows = [r for r, (_, main_row) in STUDENT_ROWS.items() if main_row] + extra
        mimco_seconds = 0.0
        for row in rows:
            run = folder(runs, row, seed)
            summary = train("pretrain", [*student, *STUDENT_ROWS[row][0]], run)
            if row.startswith("MimCo"):
                mimco_seconds = summary["train_seconds"]
            record(row, run / CHECKPOINT, run, STUDENT_ROWS[row][1])
        # the teacher alone, trained for the compute of teacher + MimCo (measured seconds)
        more = teacher_epochs * (1 + mimco_seconds / max(t_sum["train_seconds"], 1e-9))
        long_run = folder(runs, "MoCo v3, teacher + MimCo compute", seed)
        train("teacher", [*base, *p["teacher"], *s, f"optim.epochs={more:.3f}"], long_run)
        record("MoCo v3, teacher + MimCo compute", long_run / CHECKPOINT, long_run, True)
    shaped, _ = load_backbone(str(folder(runs, "MoCo v3 teacher", p["seeds"][0]) / CHECKPOINT))
    torch.manual_seed(0)
    results["random-init ViT"] = [evaluate("random-init ViT", VisionTransformer(**timm_kwargs(shaped)),
                                           folder(runs, "random-init ViT"), p, splits, True, few=True)]
    if cfg.data.channels * cfg.data.img_size**2 <= MAX_PIXEL_FEATURES:
        results["raw pixels"] = [evaluate("raw pixels", None, folder(runs, "raw pixels"), p, splits, False, few=True)]
    else:  # a 224 px image is 150k numbers: a k-NN bank of those does not fit in memory
        print(f"[reproduce] raw pixels skipped: {cfg.data.img_size} px images are too large to use as features",
              file=sys.stderr, flush=True)

    order = ["raw pixels", "random-init ViT", "MoCo v3 teacher", "MoCo v3, teacher + MimCo compute", "SimMIM",
             "MimCo (patch + image)", *ablations]
    table = []
    for row in order:
        vals = results.get(row, [])
        table.append({"row": row, "seeds": len(vals), "k-NN": _stat([v["knn"] for v in vals]),
                      "linear probe": _stat([v["linear"] for v in vals]),
                      "fine-tune": _stat([v["finetune"] for v in vals if "finetune" in v])})
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    head = (f"preset {preset}: {cfg.data.name} {cfg.data.img_size}px/patch {cfg.model.patch_size}, "
            f"{torch.get_num_threads()} threads, {(time.perf_counter() - start) / 60:.1f} min in this call; "
            "top-1 %, mean ± std over seeds")
    md = "\n".join([head, "", _spent(runs), "", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0]),
                    *["| " + " | ".join(str(v) for v in r.values()) + " |" for r in table]]) + "\n"
    md += "\n" + few_label_table(results, order, p, cfg.eval.few_label_seeds)
    s0 = p["seeds"][0]
    device = setup(cfg)
    md += "\n" + hazard(runs, s0, splits[1], cfg, device, ablations)
    (out / "results.md").write_text(md)
    panels = []
    pick = torch.randperm(len(splits[1]), generator=torch.Generator().manual_seed(0))[:2000]
    shown = ("SimMIM", "MoCo v3 teacher", "MimCo (patch + image)")
    for row in shown:
        model, _ = load_backbone(str(folder(runs, row, s0) / CHECKPOINT))
        f, y = extract_features(model.to(device), splits[1], cfg.data, device)
        panels.append((row.split(" (")[0], f[pick], y[pick]))
    tsne_figure(panels, out / "tsne.png", class_names=class_names(cfg.data))
    curves_figure([folder(runs, row, s0) for row in shown], out / "curves.png")
    print(md)


def teacher_study(preset: str, p: dict[str, Any], out: Path) -> None:
    """Does a stronger teacher make a stronger student? Each teacher of :data:`TEACHERS` over the
    seeds, with its own k-NN / linear probe next to those of its MimCo and MaskDistill students.
    The default teacher and its MimCo student share their folders with the main study."""
    runs = out / "runs"
    start = time.perf_counter()
    base = [*p["data"], *p["model"]]
    cfg = load_config(PretrainConfig, None, base)
    splits = (load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False))
    scores: dict[tuple[str, str], list[dict]] = {}
    for seed in p["seeds"]:
        s = [f"train.seed={seed}"]
        for teacher, over in TEACHERS.items():
            t_run = folder(runs, teacher, seed)
            train("teacher", [*base, *p["teacher"], *over, *s], t_run)
            model, _ = load_backbone(str(t_run / CHECKPOINT))
            scores.setdefault((teacher, "teacher"), []).append(evaluate(teacher, model, t_run, p, splits, False))
            for student, extra in TEACHER_STUDENTS.items():
                own = student == "MimCo" and not over
                row = "MimCo (patch + image)" if own else f"{student} of {folder(runs, teacher).name}"
                run = folder(runs, row, seed)
                train("pretrain", [*base, *p["student"], *s, f"teacher.checkpoint={t_run / CHECKPOINT}", *extra], run)
                model, _ = load_backbone(str(run / CHECKPOINT))
                scores.setdefault((teacher, student), []).append(evaluate(row, model, run, p, splits, False))
    cols = ["teacher", *TEACHER_STUDENTS]
    lines = [f"preset {preset}, teacher study: {cfg.data.name} {cfg.data.img_size}px, student patch "
             f"{cfg.model.patch_size}, "
             f"{torch.get_num_threads()} threads, {(time.perf_counter() - start) / 60:.1f} min in this call; top-1 %, "
             "mean ± std over seeds (k-NN k = 20 / linear probe)", "",
             "| teacher | seeds | " + " | ".join(f"{c} k-NN | {c} linear" for c in cols) + " |",
             "|---|---|" + "---|---|" * len(cols)]
    for teacher in TEACHERS:
        cells = [f"{_stat([v[k] for v in scores[(teacher, c)]])}" for c in cols for k in ("knn", "linear")]
        lines.append(f"| {teacher} | {len(scores[(teacher, 'teacher')])} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "results-teachers.md").write_text(md)
    print(md)


def _dense_scores(name: str, model: torch.nn.Module | None, run: Path, scfg: SegmentationConfig, splits: tuple,
                  p: dict[str, Any], patch: int, device: torch.device, finetune: bool = True) -> dict[str, Any]:
    """The frozen segmentation probe (:data:`DENSE_PROBE_SEEDS` heads) and, for a backbone and with
    ``finetune``, a short segmentation fine-tune of ``model``; cached in run/dense.json under a hash
    of the settings."""
    from mimco.eval.segmentation import segprobe

    fcfg = apply_overrides(SegmentationConfig(), [*_scene_keys(scfg), *p["dense_finetune"], "train.progress=false"],
                           model_keys=False)
    key = hashlib.sha256(yaml.safe_dump(to_dict(fcfg)).encode()).hexdigest()[:8]
    scenes = hashlib.sha256(yaml.safe_dump(_scene_keys(scfg)).encode()).hexdigest()[:8]
    cache = run / "dense.json"
    out = json.loads(cache.read_text()) if cache.is_file() else {}
    if out.get("probe_config") != scenes:  # other scenes: probe again
        out = {k: v for k, v in out.items() if not k.startswith("probe")}
    if out.get("finetune_config") != key:  # another recipe: fine-tune again (in its own folder)
        out = {k: v for k, v in out.items() if not k.startswith("finetune")}
    if "probe" not in out or "probe_position" not in out:  # a cached probe gets the position probe alone
        start = time.perf_counter()
        m = model.to(device) if model is not None else None
        seeds = tuple(range(DENSE_PROBE_SEEDS)) if "probe" not in out else ()
        values, _ = segprobe(m, *splits, scfg.data, device, patch=patch, seeds=seeds)
        if seeds:
            out.update(probe=values["miou"], probe_pixel_acc=values["pixel_acc"],
                       probe_seconds=round(time.perf_counter() - start, 1))
        out.update(probe_config=scenes, probe_position=values["position_acc"],
                   probe_position_share=values["position_share"])
    if finetune and model is not None and "finetune" not in out:
        fcfg.train.out_dir, fcfg.train.name = str(run), f"segfinetune-{key}"
        res = run_or_reuse("segfinetune", fcfg, run / fcfg.train.name, say="reproduce", backbone=model)
        out.update(finetune=res["miou"], finetune_config=key, finetune_seconds=res["train_seconds"])
    run.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    print(f"[reproduce] {name} (dense): {out}", file=sys.stderr, flush=True)
    return out


def _training_grid_probe(name: str, model: torch.nn.Module, run: Path, scfg: SegmentationConfig, splits: tuple,
                         size: int, patch: int, device: torch.device) -> list[float]:
    """The frozen probe with the backbone at its training size and position table: the same scenes
    resized to ``size`` px (masks nearest-neighbour for the heads' training), predictions upsampled and
    scored on the full-size masks, as the resampled probe's are. Cached in run/dense.json."""
    from mimco.eval.segmentation import segprobe

    cache = run / "dense.json"
    out = json.loads(cache.read_text()) if cache.is_file() else {}
    key = hashlib.sha256(yaml.safe_dump([*_scene_keys(scfg), size]).encode()).hexdigest()[:8]
    if out.get("grid_probe_config") != key:
        data = dataclasses.replace(scfg.data, img_size=size)
        values, _ = segprobe(model.to(device), *splits, data, device, patch=patch,
                             seeds=tuple(range(DENSE_PROBE_SEEDS)), position=False)
        out.update(grid_probe=values["miou"], grid_probe_config=key)
        run.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
        print(f"[reproduce] {name} (probe at {size} px): {values['miou']}", file=sys.stderr, flush=True)
    return out["grid_probe"]


#: the remedies study's stage-2 rows: can the student's patch tokens carry content, not position?
REMEDY_ROWS: dict[str, list[str]] = {
    "MimCo (patch + image)": [],
    "negatives: same position": ["loss.patch_negatives=position"],
    "negatives: image + same position": ["loss.patch_negatives=image+position"],
    "targets centred per position": ["loss.target_centring=position"],
    "head given the position embedding": ["loss.head_position=true"],
    "centred targets + same-position negatives": ["loss.target_centring=position", "loss.patch_negatives=position"],
    "pre-trained on scenes (teacher and student)": ["data.name=fmnist_scenes"],
}
#: remedy rows with a teacher of their own: row -> (the teacher's row, its stage-1 overrides)
REMEDY_TEACHERS: dict[str, tuple[str, list[str]]] = {
    "pre-trained on scenes (teacher and student)": ("MoCo v3 teacher on scenes", ["data.name=fmnist_scenes"]),
}


def remedy_study(preset: str, p: dict[str, Any], out: Path, rows: list[str]) -> None:
    """The teacher and each of ``rows`` (:data:`REMEDY_ROWS`) over the seeds: the frozen segmentation
    probe on the scenes with the backbone's position table resampled to the scenes' grid and at its
    training grid, the token position probe, and the image-level columns (k-NN, linear probe, and
    both from 10 labels per class). Run folders are the dense study's (shared rows are reused)."""
    runs = out / "runs"
    start = time.perf_counter()
    base, cfg, scfg, device, scenes, splits = _scene_setup(p)
    d = cfg.data
    patch, side, size = cfg.model.patch_size, scfg.data.img_size, d.img_size
    few = {**p, "few": [10]}
    results: dict[str, list[dict]] = {}

    def record(row: str, ckpt: Path, run: Path) -> None:
        image = evaluate(row, load_backbone(str(ckpt))[0], run, few, splits, False, few=True, few_finetune=False)
        dense = _dense_scores(row, load_backbone(str(ckpt), img_size=side)[0], run, scfg, scenes, p, patch, device,
                              finetune=False)
        grid = _training_grid_probe(row, load_backbone(str(ckpt))[0], run, scfg, scenes, size, patch, device)
        results.setdefault(row, []).append({**dense, "grid": grid, "knn": image["knn"], "linear": image["linear"],
                                            "few": image["few"]["10"]})

    fixed = p.get("teacher_seed")  # None: each seed's own teacher; else every student learns from this one
    for seed in p["seeds"]:
        s = [f"train.seed={seed}"]
        tseed = seed if fixed is None else fixed
        t_run = folder(runs, "MoCo v3 teacher", tseed)
        train("teacher", [*base, *p["teacher"], f"train.seed={tseed}"], t_run)
        if tseed == seed or fixed is None:
            record("MoCo v3 teacher", t_run / CHECKPOINT, t_run)
        for row in rows:
            teacher = t_run
            if row in REMEDY_TEACHERS:
                name, over = REMEDY_TEACHERS[row]
                teacher = folder(runs, name, tseed)
                train("teacher", [*base, *p["teacher"], f"train.seed={tseed}", *over], teacher)
                if tseed == seed:
                    record(name, teacher / CHECKPOINT, teacher)
            run = folder(runs, row, seed)
            if tseed != seed:  # a student of another seed's teacher has a folder of its own
                run = run.with_name(f"{run.name}-t{tseed}")
            train("pretrain", [*base, *p["student"], *s, f"teacher.checkpoint={teacher / CHECKPOINT}",
                               *REMEDY_ROWS[row]], run)
            record(row, run / CHECKPOINT, run)
    n, g = side // patch, size // patch
    lines = [f"preset {preset}, remedies study: {scfg.seg.scenes} training and {scfg.seg.val_scenes} validation "
             f"Fashion-MNIST scenes of {side} px, 11 classes; {torch.get_num_threads()} threads, "
             f"{(time.perf_counter() - start) / 60:.1f} min in this call. mIoU %: the frozen probe (BN + 1x1 conv on "
             f"the last block's patch tokens, {DENSE_PROBE_SEEDS} heads per model) with the backbone at {side} px "
             f"({n}x{n} patches, position table resampled) and at its training size {size} px ({g}x{g}, the scenes "
             f"resized; scored on the {side}-px masks); token position: linear probe of each {side}-px token's grid "
             f"position (accuracy %, chance {100 / n ** 2:.1f}) and the share of the tokens' variance position "
             f"explains (%); k-NN / linear probe: {d.name} test top-1 % from all labels and from 10 per class "
             f"({cfg.eval.few_label_seeds} label subsets); mean ± std over model seeds (x probe heads or subsets)"
             + (f"; every student learns from the seed-{fixed} teacher" if fixed is not None else "") + ".",
             "", "| row | seeds | probe mIoU | probe mIoU, training grid | token position acc. | position variance "
             "share | k-NN | linear probe | k-NN 10/class | linear 10/class |", "|---|" + "---|" * 9]
    order = ["MoCo v3 teacher"] + [r for row in rows for r in ([REMEDY_TEACHERS[row][0]] if row in REMEDY_TEACHERS
                                                                else []) + [row]]
    for row in order:
        vals = results.get(row, [])
        cells = [_stat([x for v in vals for x in v["probe"]]), _stat([x for v in vals for x in v["grid"]]),
                 _stat([v["probe_position"] for v in vals]), _stat([v["probe_position_share"] for v in vals]),
                 _stat([v["knn"] for v in vals]), _stat([v["linear"] for v in vals]),
                 *(_stat([x for v in vals for x in v["few"][k]]) for k in ("knn", "linear"))]
        lines.append(f"| {row} | {len(vals)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-remedies.md").write_text(md)
    print(md)


def _scene_keys(scfg: SegmentationConfig) -> list[str]:
    d = scfg.data
    return [f"data.root={d.root}", f"data.channels={d.channels}", f"data.mean={list(d.mean)}",
            f"data.std={list(d.std)}", f"data.img_size={d.img_size}", "data.num_workers=0",
            *[f"seg.{k}={v}" for k, v in to_dict(scfg.seg).items()]]


def _scene_setup(p: dict[str, Any]) -> tuple[list[str], PretrainConfig, SegmentationConfig, torch.device, tuple,
                                               tuple]:
    """The dense studies' common ground: the preset's data and model overrides, its pre-training
    config, the scenes' config, the device, the scenes (train, val) and the image splits (train, test)."""
    from mimco.data.segmentation import load_segmentation

    base = [*p["data"], *p["model"]]
    cfg = load_config(PretrainConfig, None, base)
    d = cfg.data
    scfg = apply_overrides(SegmentationConfig(), [f"data.root={d.root}", f"data.channels={d.channels}",
                                                  f"data.mean={list(d.mean)}", f"data.std={list(d.std)}",
                                                  "data.num_workers=0", *p["dense"]], model_keys=False)
    device = setup(cfg)
    scenes = (load_segmentation(scfg.data, scfg.seg, True), load_segmentation(scfg.data, scfg.seg, False, False))
    return base, cfg, scfg, device, scenes, (load_dataset(d, train=True), load_dataset(d, train=False))


def dense_study(preset: str, p: dict[str, Any], out: Path) -> None:
    """Do MimCo's patch-level targets give better dense features? The teacher, SimMIM, MimCo, its
    patch-only and image-only ablations and MaskDistill, each over the seeds (trained here or
    reused from the main and teacher studies' folders): the frozen segmentation probe and a short
    segmentation fine-tune on Fashion-MNIST scenes, beside k-NN and linear probe top-1."""
    runs = out / "runs"
    start = time.perf_counter()
    base, cfg, scfg, device, scenes, splits = _scene_setup(p)
    d = cfg.data
    patch, side = cfg.model.patch_size, scfg.data.img_size
    results: dict[str, list[dict]] = {}

    def record(row: str, ckpt: Path, run: Path) -> None:
        image = evaluate(row, load_backbone(str(ckpt))[0], run, p, splits, False)
        model, _ = load_backbone(str(ckpt), img_size=side)
        results.setdefault(row, []).append({**_dense_scores(row, model, run, scfg, scenes, p, patch, device),
                                            "knn": image["knn"], "linear": image["linear"]})

    for seed in p["seeds"]:
        s = [f"train.seed={seed}"]
        t_run = folder(runs, "MoCo v3 teacher", seed)
        train("teacher", [*base, *p["teacher"], *s], t_run)
        record("MoCo v3 teacher", t_run / CHECKPOINT, t_run)
        student = [*base, *p["student"], *s, f"teacher.checkpoint={t_run / CHECKPOINT}"]
        for row, over in DENSE_ROWS.items():
            run = folder(runs, row, seed)
            train("pretrain", [*student, *over], run)
            record(row, run / CHECKPOINT, run)
    shaped, _ = load_backbone(str(folder(runs, "MoCo v3 teacher", p["seeds"][0]) / CHECKPOINT), img_size=side)
    torch.manual_seed(0)
    results["random-init ViT"] = [_dense_scores("random-init ViT", VisionTransformer(**timm_kwargs(shaped)),
                                                folder(runs, "random-init ViT"), scfg, scenes, p, patch, device)]
    results["raw pixels"] = [_dense_scores("raw pixels", None, folder(runs, "raw pixels"), scfg, scenes, p, patch,
                                           device)]
    order = ["raw pixels", "random-init ViT", "MoCo v3 teacher", *DENSE_ROWS]
    n = side // patch
    lines = [f"preset {preset}, dense study: {scfg.seg.scenes} training and {scfg.seg.val_scenes} validation "
             f"Fashion-MNIST scenes of {side} px ({n}x{n} patches of {patch}), 11 classes; "
             f"{torch.get_num_threads()} threads, {(time.perf_counter() - start) / 60:.1f} min in this call. mIoU %: "
             f"the frozen probe (BN + 1x1 conv on the last block's patch tokens, {DENSE_PROBE_SEEDS} heads per model) "
             f"and a segmentation fine-tune ({' '.join(p['dense_finetune'])}); k-NN / linear probe: {d.name} test "
             "top-1 % (the main study's columns); token position: a linear probe of each frozen patch token's grid "
             f"position (accuracy %, chance {100 / n ** 2:.1f}) and the share of the tokens' variance that position "
             "explains (%), mimco.eval.position; mean ± std over model seeds (x probe heads).", "",
             "| row | seeds | probe mIoU | token position acc. | position variance share | fine-tune mIoU | "
             "probe seconds | k-NN | linear probe |", "|---|---|---|---|---|---|---|---|---|"]
    for row in order:
        vals = results.get(row, [])
        lines.append(f"| {row} | {len(vals)} | {_stat([x for v in vals for x in v['probe']])} | "
                     f"{_stat([v['probe_position'] for v in vals])} | "
                     f"{_stat([v['probe_position_share'] for v in vals])} | "
                     f"{_stat([v['finetune'] for v in vals if 'finetune' in v])} | "
                     f"{_stat([v['probe_seconds'] for v in vals])} | {_stat([v['knn'] for v in vals if 'knn' in v])} | "
                     f"{_stat([v['linear'] for v in vals if 'linear' in v])} |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-dense.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
