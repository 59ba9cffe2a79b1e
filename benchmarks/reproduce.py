"""The paper's claims in miniature: MimCo against its teacher, SimMIM and feature regression,
with ablations of the choices docs/method.md marks as ours.

    python benchmarks/reproduce.py --preset smoke            # minutes: checks the machinery
    python benchmarks/reproduce.py --preset cpu              # Fashion-MNIST, 16 tokens, 2 CPU cores
    python benchmarks/reproduce.py --preset gpu              # ViT-Tiny 32 px / patch 4 on one GPU
    python benchmarks/reproduce.py --preset cpu --teachers   # stronger / finer-grid teachers, MimCo vs MaskDistill
    python benchmarks/reproduce.py --preset cpu --dense      # segmentation on Fashion-MNIST scenes (patch level)
    python benchmarks/reproduce.py --preset cpu --remedies   # patch tokens: position or content? (REMEDY_ROWS)
    python benchmarks/reproduce.py --preset cpu --write-spec cpu.yaml   # the study as a spec for `mimco study`

Each study is a spec of mimco's study runner (:mod:`mimco.studies`, ``mimco study``) built from a
preset: every run a normal run folder under OUT/runs/, a finished run (and each score) reused, an
interrupted one resumed. OUT/results.md and results.csv hold one table: k-NN (k = 20), linear
probe, fine-tune top-1 and the few-label columns (mean ± std over seeds), then the false-negative
hazard of same-image patch negatives; OUT/tsne.png shows SimMIM, teacher and MimCo (seed 0),
OUT/curves.png their training curves. --teachers (OUT/results-teachers.md): each teacher of
TEACHERS and its MimCo and MaskDistill students. --dense (OUT/results-dense.md): the frozen
segmentation probe (mIoU, 3 heads per model) with the token position probe and a short
segmentation fine-tune on Fashion-MNIST scenes, beside k-NN and linear probe. --remedies
(OUT/results-remedies.md): the switches that could keep grid position out of the student's patch
tokens, each with the scenes probe at two grids, the token position probe and the image-level
columns (k-NN, linear probe, 10 labels per class).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mimco.config import PretrainConfig, SegmentationConfig, apply_overrides, load_config
from mimco.data.build import load_dataset
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches
from mimco.eval.plots import read_log
from mimco.models.formats import load_backbone
from mimco.models.vit import encode
from mimco.pipeline import StageStopped, setup
from mimco.runs import CHECKPOINT, CONFIG, LOG
from mimco.studies import RowSpec, RunSpec, StudySpec, check_protocols, run_study, spec_dict

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
#: heads of the frozen segmentation probe per model
DENSE_PROBE_SEEDS = 3

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

#: the rows that are not stage-2 variants, and their run folders
OTHER_FOLDERS = {"MoCo v3 teacher": "teacher", "MoCo v3, teacher + MimCo compute": "teacher-long",
                 "random-init ViT": "random-init", "raw pixels": "raw-pixels"}


def slug(row: str) -> str:
    """The run folder of a study row (without its seed): the one place names are made."""
    return OTHER_FOLDERS.get(row) or row.split(" (")[0].replace(" ", "-").replace(":", "").replace(",", "").lower()


def _spec(p: dict[str, Any], title: str, runs: dict[str, RunSpec], rows: list[RowSpec], protocols: list[str],
          options: dict[str, dict], **more: Any) -> StudySpec:
    """A study of preset ``p``: its data and model keys for every run, its teacher / student keys per
    stage, its seeds; the run folders under OUT/runs/."""
    over = [*p["data"], *p["model"], "train.progress=false", "eval.at_end=false", "train.ckpt_every=100"]
    s = StudySpec("reproduce", runs, rows, title, over, {"teacher": list(p["teacher"]), "pretrain": list(p["student"])},
                  list(p["seeds"]), folders="runs", protocols=protocols, options=options, **more)
    check_protocols(s)
    return s


def _student(overrides: list[str], seeds: str = "all", teacher: str = "teacher") -> RunSpec:
    return RunSpec("pretrain", overrides=list(overrides), teacher=teacher, seeds=seeds)


#: the keys of the scenes a preset's ``dense`` list (and ``dense:KEY=VALUE``) may set
SCENE_KEYS = ("data.img_size", "seg.scenes", "seg.val_scenes")


def _scenes(p: dict[str, Any]) -> dict[str, Any]:
    """The preset's scenes (its ``dense`` keys) as a dense protocol's options."""
    other = [o for o in p["dense"] if o.split("=", 1)[0] not in SCENE_KEYS]
    if other:
        raise MimcoError(f"dense:{other[0]} is not a key of the scenes; dense: takes {', '.join(SCENE_KEYS)}")
    seg = apply_overrides(SegmentationConfig(), list(p["dense"]), model_keys=False)
    return {"img_size": seg.data.img_size, "scenes": seg.seg.scenes, "val_scenes": seg.seg.val_scenes}


def main_spec(preset: str, p: dict[str, Any]) -> StudySpec:
    """The main study: the teacher, SimMIM, MimCo and the ablations (the first seed, but the preset's
    seeded ones), a teacher trained for the compute of teacher + MimCo, raw pixels and a random-init
    ViT; k-NN, linear probe and fine-tune of the main rows with the few-label columns, the ablations'
    k-NN and linear probe."""
    ablations = [r for r, (_, main_row) in STUDENT_ROWS.items() if not main_row]
    if p["ablations"] != "all":
        ablations = [r for r in ablations if r in p["ablations"]]
    few = [f"few{n}" for n in p["few"]] + [f"finetune{p['few'][0]}"]
    runs = {"teacher": RunSpec("teacher"),
            **{slug(r): _student(o) for r, (o, main_row) in STUDENT_ROWS.items() if main_row},
            **{slug(r): _student(STUDENT_ROWS[r][0], "all" if r in p.get("seeded", []) else "first")
               for r in ablations},
            "teacher-long": RunSpec("teacher", compute_of=["teacher", "mimco"])}
    main = ["knn", "linear", "finetune", *few]
    rows = [RowSpec("raw pixels", backbone="pixels", protocols=["knn", "linear", *few[:-1]]),
            RowSpec("random-init ViT", backbone="random-timm", protocols=main),
            RowSpec("MoCo v3 teacher", "teacher", protocols=main),
            RowSpec("MoCo v3, teacher + MimCo compute", "teacher-long", protocols=main),
            RowSpec("SimMIM", "simmim", protocols=main), RowSpec("MimCo (patch + image)", "mimco", protocols=main),
            *[RowSpec(r, slug(r), protocols=["knn", "linear"]) for r in ablations]]
    options = {"finetune": {"overrides": p["finetune"]},
               f"finetune{p['few'][0]}": {"overrides": [*p["finetune"], *p["few_finetune"]]},
               **{f"few{n}": {"per_class": n} for n in p["few"]}}
    return _spec(p, f"preset {preset}", runs, rows,
                 ["knn", "linear", "finetune", *[f"few{n}=few" for n in p["few"]], f"finetune{p['few'][0]}=finetune"],
                 options, eval_run="mimco", pictures=["tsne", "curves"],
                 shown=["SimMIM", "MoCo v3 teacher", "MimCo (patch + image)"])


def teacher_spec(preset: str, p: dict[str, Any]) -> StudySpec:
    """Does a stronger teacher make a stronger student? Each teacher of :data:`TEACHERS` and its
    MimCo and MaskDistill students (k-NN, linear probe); the default teacher and its MimCo student
    are the main study's runs."""
    runs: dict[str, RunSpec] = {}
    rows: list[RowSpec] = []
    for teacher, over in TEACHERS.items():
        t = slug(teacher)
        runs[t] = RunSpec("teacher", overrides=list(over))
        rows.append(RowSpec(teacher, t))
        for student, extra in TEACHER_STUDENTS.items():
            run = "mimco" if student == "MimCo" and not over else slug(f"{student} of {t}")
            runs[run] = _student(extra, teacher=t)
            rows.append(RowSpec(f"{student} of {t}", run))
    return _spec(p, f"preset {preset}, teacher study", runs, rows, ["knn", "linear"], {}, eval_run="mimco")


def dense_spec(preset: str, p: dict[str, Any]) -> StudySpec:
    """Do MimCo's patch-level targets give better dense features? The teacher, SimMIM, MimCo, its
    patch-only and image-only ablations, batch negatives and MaskDistill (the main and teacher
    studies' runs): the frozen segmentation probe with the token position probe and a short
    segmentation fine-tune on Fashion-MNIST scenes, beside k-NN and linear probe."""
    runs = {"teacher": RunSpec("teacher"), **{slug(r): _student(o) for r, o in DENSE_ROWS.items()}}
    dense = ["segprobe", "segfinetune"]
    rows = [RowSpec("raw pixels", backbone="pixels", protocols=dense),
            RowSpec("random-init ViT", backbone="random-timm", protocols=dense),
            RowSpec("MoCo v3 teacher", "teacher"), *[RowSpec(r, slug(r)) for r in DENSE_ROWS]]
    scenes = _scenes(p)
    return _spec(p, f"preset {preset}, dense study", runs, rows, [*dense, "knn", "linear"],
                 {"segprobe": {**scenes, "heads": DENSE_PROBE_SEEDS, "position_share": True},
                  "segfinetune": {**scenes, "overrides": p["dense_finetune"]}}, eval_run="mimco")


def remedy_spec(preset: str, p: dict[str, Any], chosen: list[str]) -> StudySpec:
    """The teacher and each of ``chosen`` (:data:`REMEDY_ROWS`, with its own teacher where
    :data:`REMEDY_TEACHERS` says): the scenes probe with the backbone's position table resampled to
    the scenes' grid and at its training grid, the token position probe, and k-NN, linear probe and
    both from 10 labels per class. Run folders are the dense study's (shared rows are reused)."""
    runs, rows = {"teacher": RunSpec("teacher")}, [RowSpec("MoCo v3 teacher", "teacher")]
    for row in chosen:
        teacher = "teacher"
        if row in REMEDY_TEACHERS:
            name, over = REMEDY_TEACHERS[row]
            teacher = slug(name)
            runs[teacher] = RunSpec("teacher", overrides=list(over))
            rows.append(RowSpec(name, teacher))
        runs[slug(row)] = _student(REMEDY_ROWS[row], teacher=teacher)
        rows.append(RowSpec(row, slug(row)))
    scenes = {**_scenes(p), "heads": DENSE_PROBE_SEEDS}
    return _spec(p, f"preset {preset}, remedies study", runs, rows,
                 ["segprobe", "grid=segprobe", "knn", "linear", "few10=few"],
                 {"segprobe": {**scenes, "position_share": True}, "grid": {**scenes, "grid": "training"},
                  "few10": {"per_class": 10}},
                 eval_run="teacher", teacher_seed=p.get("teacher_seed"))


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


def hazard(spec: StudySpec, runs: Path) -> str:
    """The false-negative hazard of same-image patch negatives, in numbers: how alike the teacher's
    patch tokens of one image are, and where each variant's patch loss ends against chance."""
    cfg = load_config(PretrainConfig, None, spec.overrides)
    device = setup(cfg)
    s0 = spec.seeds[0]
    teacher, _ = load_backbone(str(runs / f"teacher-s{s0}" / CHECKPOINT))
    sim = patch_similarity(teacher.to(device), load_dataset(cfg.data, train=False), cfg, device)
    n = (cfg.data.img_size // cfg.model.patch_size) ** 2
    lines = [f"Same-image teacher patch tokens (seed-{s0} teacher, {n} tokens, 1000 test images): cosine similarity "
             f"median {np.median(sim):.3f}, 95th percentile {np.quantile(sim, 0.95):.3f}, "
             f"{100 * (sim > 0.95).mean():.1f} % of pairs above 0.95.", "",
             "| patch loss variant | final patch loss | chance (log #candidates) |", "|---|---|---|"]
    for row in ["MimCo (patch + image)", *[r.name for r in spec.rows if r.name in STUDENT_ROWS]]:
        over = dict(o.split("=", 1) for o in STUDENT_ROWS[row][0])
        if (over.get("loss.patch_loss", "infonce") != "infonce" or over.get("loss.patch_weight") == "0"
                or over.get("method") == "simmim" or (row == "MimCo (patch + image)" and f"| {row} |" in lines[-1])):
            continue
        run = runs / f"{slug(row)}-s{s0}"
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
    ap.add_argument("--write-spec", metavar="FILE",
                    help="write the study as a spec for `mimco study FILE --out OUT` (and run nothing)")
    ap.add_argument("overrides", nargs="*", metavar="[STAGE:]KEY=VALUE",
                    help="config overrides on top of the preset: data.*, model.*, train.* for every stage; "
                         "teacher:KEY=VALUE, student:KEY=VALUE or finetune:KEY=VALUE for one stage")
    return ap


def _rows(given: str, known: dict, what: str) -> list[str]:
    rows = list(dict.fromkeys(given.split(",")))
    unknown = sorted(set(rows) - set(known))
    if unknown:
        raise MimcoError(f"unknown {what} row(s) {unknown}; choose from {sorted(known)}")
    return rows


def study(args: argparse.Namespace) -> tuple[StudySpec, str]:
    """The spec the command line asks for, and the name of its table (OUT/<name>.md)."""
    p = with_overrides(PRESETS[args.preset], args.overrides)
    p["seeds"] = args.seeds or p["seeds"]
    if args.ablations:
        p["ablations"] = ("all" if args.ablations == "all" else [] if args.ablations == "none"
                          else _rows(args.ablations, STUDENT_ROWS, "ablation"))
    if args.seeded_ablations:
        p["seeded"] = (CLAIM_3 if args.seeded_ablations == "claim3"
                       else _rows(args.seeded_ablations, STUDENT_ROWS, "ablation"))
    if args.teacher_seed is not None and not args.remedies:
        raise MimcoError("--teacher-seed applies to --remedies alone; drop it or add --remedies")
    if args.remedies:
        p["teacher_seed"] = args.teacher_seed
        chosen = list(REMEDY_ROWS) if args.remedies == "all" else _rows(args.remedies, REMEDY_ROWS, "remedy")
        return remedy_spec(args.preset, p, chosen), "results-remedies"
    if args.teachers:
        return teacher_spec(args.preset, p), "results-teachers"
    if args.dense:
        return dense_spec(args.preset, p), "results-dense"
    return main_spec(args.preset, p), "results"


def main() -> None:
    args = build_parser().parse_args()
    try:
        spec, table = study(args)
        if args.write_spec:
            Path(args.write_spec).write_text(yaml.safe_dump(spec_dict(spec), sort_keys=False, width=120))
            print(f"wrote {args.write_spec}; run it with: mimco study {args.write_spec} --out OUT")
            return
        out = Path(args.out or Path(__file__).parent / "results" / f"reproduce-{args.preset}")
        md = run_study(spec, out, table=table)
        if table == "results":  # the main study's table, then the hazard of same-image negatives
            more = hazard(spec, out / "runs")
            (out / "results.md").write_text(md + "\n" + more)
            print(more)
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


if __name__ == "__main__":
    main()
