"""``mimco demo``: MoCo v3 teacher, MimCo student and their evaluation on Fashion-MNIST.

Uses the bundled ``fmnist_teacher.yaml`` and ``fmnist_pretrain.yaml``. A stage whose run
already finished in the output folder is reused; an interrupted one is resumed. Besides the
image-level columns (k-NN, linear probe, few labels), one dense column: the frozen segmentation
probe's mIoU on Fashion-MNIST scenes (:mod:`mimco.data.scenes`), with every backbone read at the
scenes' side (its position table resampled) and raw pixels as each patch's pixels.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

from mimco.config import PretrainConfig, SegmentationConfig, TeacherStageConfig, apply_overrides, load_config
from mimco.data.build import class_names, load_dataset
from mimco.eval.features import eval_batches
from mimco.eval.plots import attention_figure, curves_figure, denormalize, pca_figure, tsne_figure
from mimco.eval.probe import mean_std, probe_backbone, probe_few_labels
from mimco.models import create_vit
from mimco.models.formats import load_backbone
from mimco.pipeline import run_or_reuse, setup
from mimco.runs import CHECKPOINT

TSNE_POINTS = 2000
QUICK = ["data.subset=6000", "optim.epochs=2", "optim.warmup_epochs=0.5"]
DENSE_QUICK = ["seg.scenes=500", "seg.val_scenes=200"]
DENSE_SEEDS = 3  # heads per backbone in the dense column (mean ± std)


def _stage(stage: str, cfg: TeacherStageConfig | PretrainConfig, run_dir: Path) -> float:
    """Run (or resume, or reuse) one stage; returns its training minutes. A stopped stage raises
    :class:`~mimco.pipeline.StageStopped`: the demo goes no further."""
    return run_or_reuse(stage, cfg, run_dir, say="demo").get("train_seconds", 0.0) / 60


def write_table(rows: list[dict[str, Any]], out: Path, header: str) -> str:
    """Markdown + CSV of the result rows; returns the Markdown."""
    cols = list(rows[0])
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


def dense_column(models: list[tuple[str, Any]], pcfg: PretrainConfig, out: Path, device: torch.device,
                 overrides: list[str]) -> tuple[dict[str, str], dict[str, str], SegmentationConfig]:
    """The frozen segmentation probe (:func:`mimco.eval.segmentation.segprobe`, :data:`DENSE_SEEDS`
    heads) on Fashion-MNIST scenes for each (name, backbone maker at a side, or None for raw pixels);
    writes ``pca.png`` (the trained backbones' patch tokens on eight validation scenes) and returns
    ({name: "mIoU ± std"}, {name: the position probe's accuracy, :mod:`mimco.eval.position`}, the
    scenes' config)."""
    from mimco.data.segmentation import load_segmentation
    from mimco.eval.segmentation import segprobe, val_batches

    d = pcfg.data
    scfg = apply_overrides(SegmentationConfig(), [f"data.root={d.root}", f"data.channels={d.channels}",
                                                  f"data.mean={list(d.mean)}", f"data.std={list(d.std)}",
                                                  "data.num_workers=0", *overrides], model_keys=False)
    train = load_segmentation(scfg.data, scfg.seg, train=True)
    val = load_segmentation(scfg.data, scfg.seg, train=False)
    side, column, positions, pca_rows = scfg.data.img_size, {}, {}, []
    for name, make in models:
        model = make(side).to(device) if make is not None else None
        values, _ = segprobe(model, train, val, scfg.data, device, patch=pcfg.model.patch_size,
                             seeds=tuple(range(DENSE_SEEDS)))
        m, sd = mean_std(values["miou"])
        column[name] = f"{m:.1f} ± {sd:.1f}"
        positions[name] = f"{values['position_acc']:.1f}"
        print(f"[demo] {name}: scenes mIoU {column[name]} (pixel accuracy {mean_std(values['pixel_acc'])[0]:.1f}); "
              f"token position: accuracy {values['position_acc']:.1f} (chance {values['position_chance']:.1f}), "
              f"variance share {values['position_share']:.1f}")
        if model is not None and name != "random-init ViT":
            pca_rows.append((name, model))
    x = next(iter(val_batches(val, scfg.data, 8)))[0].to(device)
    pca_figure(pca_rows, x, denormalize(x, scfg.data.mean, scfg.data.std), out / "pca.png")
    return column, positions, scfg


def run_demo(out: Path, quick: bool = False, threads: int = 0, overrides: tuple[str, ...] = (),
             teacher: tuple[str, ...] = (), student: tuple[str, ...] = (), dense: tuple[str, ...] = ()) -> str:
    """Both stages from the bundled Fashion-MNIST configs (``overrides`` go to both after them,
    ``teacher`` / ``student`` to one), then the evaluation table (``dense``: overrides of the dense
    column's scenes) and pictures; returns the table."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    extra = (QUICK if quick else []) + ([f"train.threads={threads}"] if threads else []) + list(overrides)
    tcfg = load_config(TeacherStageConfig, "fmnist_teacher",
                       [f"train.out_dir={out}", "train.name=teacher", *extra, *teacher])
    t_min = _stage("teacher", tcfg, out / "teacher")
    student_run = [f"train.out_dir={out}", "train.name=mimco", f"teacher.checkpoint={out / 'teacher' / CHECKPOINT}"]
    pcfg = load_config(PretrainConfig, "fmnist_pretrain", [*student_run, *extra, *student])
    s_min = _stage("pretrain", pcfg, out / "mimco")

    print(f"[demo] evaluating (k-NN k={pcfg.eval.knn_k} on the training bank, linear probe on frozen CLS features, "
          f"the test split; few labels: {pcfg.eval.few_per_class} per class, {pcfg.eval.few_label_seeds} subsets)")
    eval_start = time.perf_counter()
    device = setup(pcfg)
    data = pcfg.data
    train, test = load_dataset(data, train=True), load_dataset(data, train=False)
    def random_vit(side: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_vit(pcfg.model, side, data.channels)

    def trained(run: str) -> Any:
        return lambda side: load_backbone(str(out / run / CHECKPOINT), img_size=side)[0]

    makers: list[tuple[str, Any, str]] = [
        ("raw pixels", None, "-"), ("random-init ViT", random_vit, "0"),
        ("MoCo v3 teacher", trained("teacher"), f"{t_min:.1f}"),
        ("MimCo student", trained("mimco"), f"{t_min + s_min:.1f} (teacher + {s_min:.1f})")]
    models: list[tuple[str, torch.nn.Module | None, str]] = [
        (name, make(data.img_size) if make is not None else None, minutes) for name, make, minutes in makers]
    ev = pcfg.eval
    few_knn, few_lin = f"k-NN {ev.few_per_class}/class", f"linear {ev.few_per_class}/class"
    rows, panels = [], []
    for name, model, minutes in models:
        model = model.to(device) if model is not None else None
        r = probe_backbone(model, (train, test), data, ev, device, seed=0)
        panels.append((name, r.test_features[:TSNE_POINTS], r.test_labels[:TSNE_POINTS]))
        few = probe_few_labels(model, train, r.test_features, r.test_labels, data, device, ev.few_per_class,
                               seeds=tuple(range(ev.few_label_seeds)), ks=(ev.few_knn_k,), linear={"seed": 0})
        fk, fl = mean_std(few[f"knn{ev.few_knn_k}_top1"]), mean_std(few["linear_top1"])
        rows.append({"model": name, "train minutes": minutes, "k-NN top-1": f"{r.knn_top1:.1f}",
                     "linear probe top-1": f"{r.linear_top1:.1f}", few_knn: f"{fk[0]:.1f} ± {fk[1]:.1f}",
                     few_lin: f"{fl[0]:.1f} ± {fl[1]:.1f}"})
        print(f"[demo] {name}: k-NN {r.knn_top1:.1f}  linear {r.linear_top1:.1f}  {ev.few_per_class}/class: "
              f"k-NN {fk[0]:.1f} ± {fk[1]:.1f}  linear {fl[0]:.1f} ± {fl[1]:.1f}")
    print(f"[demo] dense column: frozen segmentation probe (BN + 1x1 conv on the last block's patch tokens, "
          f"{DENSE_SEEDS} heads) on Fashion-MNIST scenes")
    dense_col, position_col, scfg = dense_column([(n, make) for n, make, _ in makers], pcfg, out,
                                   device, [*(DENSE_QUICK if quick else []), *dense])
    s = scfg.data.img_size
    dense_key, position_key = f"scenes mIoU ({s}px)", "token position acc."
    for r in rows:
        r[dense_key], r[position_key] = dense_col[r["model"]], position_col[r["model"]]
    header = (f"{data.name} test top-1 (%), ViT {data.img_size}px/patch {pcfg.model.patch_size}, width "
              f"{pcfg.model.embed_dim}, depth {pcfg.model.depth}; {dense_key}: the frozen segmentation probe on "
              f"{scfg.seg.val_scenes} validation scenes of {s} x {s} px ({s // pcfg.model.patch_size}x"
              f"{s // pcfg.model.patch_size} patches), mean ± std over {DENSE_SEEDS} heads; {position_key}: a "
              f"linear probe of each patch token's grid position on the same scenes (chance "
              f"{100 / (s // pcfg.model.patch_size) ** 2:.1f}); "
              f"{torch.get_num_threads()} threads; training {t_min + s_min:.1f} min + evaluation "
              f"{(time.perf_counter() - eval_start) / 60:.1f} min{' (quick)' if quick else ''}")
    md = write_table(rows, out, header)
    print("\n" + md)
    print("[demo] drawing t-SNE, training curves and attention maps")
    tsne_figure(panels, out / "tsne.png", class_names=class_names(data))
    curves_figure([out / "teacher", out / "mimco"], out / "curves.png")
    x, _ = next(iter(eval_batches(test, data, 8, device)))
    shown = test.batch(torch.arange(8)).float() / 255
    attention_figure([(n, m) for n, m, _ in models[2:]], x, shown, out / "attention.png")
    print(f"[demo] wrote {out / 'results.md'}, {out / 'results.csv'}, tsne.png, curves.png, attention.png, pca.png "
          f"({(time.perf_counter() - start) / 60:.1f} min in all)")
    return md
