"""The model card (``README.md``) of an exported hub folder, written from what the run recorded:
its config (data, method, teacher, schedule), ``summary.json`` (steps, k-NN) and the evaluation
results under ``<run>/eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mimco.runs import read_summary


def _arch(vit: nn.Module) -> str:
    p = vit.patch_embed
    n = sum(t.numel() for t in vit.parameters())
    return (f"ViT, width {vit.embed_dim}, depth {len(vit.blocks)}, {vit.blocks[0].attn.num_heads} heads, patch "
            f"{p.patch_size[0]}, {p.img_size[0]} px, {p.proj.in_channels} channels ({n / 1e6:.2f} M parameters)")


def _training_rows(config: Any, progress: tuple[int, int] | None) -> list[tuple[str, str]]:
    d, o = config.data, config.optim
    rows = [("data", f"{d.name}{f' ({d.root})' if d.root else ''}, {d.img_size} px, mean {d.mean[:d.channels]}, "
                     f"std {d.std[:d.channels]}"),
            ("method", str(config.method))]
    if (teacher := getattr(config, "teacher", None)) is not None and teacher.checkpoint:
        rows.append(("teacher", f"{teacher.checkpoint} (image target {teacher.image_target})"))
    if (mask := getattr(config, "mask", None)) is not None:
        rows.append(("masking", f"{mask.type}, ratio {mask.ratio}"))
    if (model := getattr(config, "model", None)) is not None and model.init_from:
        rows.append(("initialised from", model.init_from))
    if progress is not None:
        step, total = progress
        done = o.epochs * step / max(total, 1)
        rows.append(("trained", f"{done:.4g} of {o.epochs:g} epochs (step {step} of {total})"))
    else:
        rows.append(("schedule", f"{o.epochs:g} epochs"))
    rows.append(("optimiser", f"AdamW, global batch {o.batch_size}, base lr {o.base_lr:g} (x batch / 256), weight "
                              f"decay {o.weight_decay:g}, warm-up {o.warmup_epochs:g} epochs"))
    return rows


def _result_rows(run_dir: Path | None, summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(name, f"{summary[key]:.2f} %") for key, name in (("knn_top1", "k-NN top-1 at the end of the run"),
                                                             ("knn_monitor", "k-NN monitor (subsets) at the end"))
            if isinstance(summary.get(key), (int, float))]
    if run_dir is not None and (results := run_dir / "eval" / "results.jsonl").is_file():
        for r in (json.loads(line) for line in results.read_text().splitlines() if line.strip()):
            values = ", ".join(f"{k} {v}" for k, v in r.get("metrics", {}).items() if not k.endswith("seconds"))
            rows.append((f"`mimco {r.get('command')}` of {r.get('name')}", values))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def model_card(vit: nn.Module, name: str, source: str, source_format: str, config: Any = None,
               run_dir: Path | None = None, progress: tuple[int, int] | None = None) -> str:
    """The card's Markdown, with the Hugging Face hub's YAML header (library ``timm``). ``progress``:
    the checkpoint's (step, total steps); the run's summary and evaluations are those of its
    final weights, shown only for a checkpoint at the summary's step."""
    summary = read_summary(run_dir) if run_dir is not None else {}
    if progress is not None and summary.get("step") != progress[0]:  # an earlier snapshot
        summary, run_dir = {}, None
    lines = ["---", "license: apache-2.0", "library_name: timm",
             "tags: [image-feature-extraction, timm, mimco, self-supervised]", "---", "", f"# {name}", "",
             f"A {_arch(vit)} exported by [mimco](https://arxiv.org/abs/2209.03063) from `{source}` "
             f"({source_format}). The folder is a timm hub folder: `model.safetensors` holds the backbone without a "
             "classifier (`num_classes=0`), `config.json` its exact architecture and preprocessing.", ""]
    if config is not None:
        lines += ["## Training", "", _table(_training_rows(config, progress)), ""]
    results = _result_rows(run_dir, summary)
    lines += ["## Results", "", _table(results) if results else "No evaluation was recorded with the run.", ""]
    lines += ["## Use", "", "```python", "import timm", "",
              f'model = timm.create_model("local-dir:{name}", pretrained=True)  # "hf-hub:USER/{name}" once uploaded',
              "cfg = timm.data.resolve_data_config({}, model=model)  # the training data's mean and std",
              "transform = timm.data.create_transform(**cfg)",
              "features = model.forward_features(transform(image).unsqueeze(0))  # (1, tokens, width)", "```", ""]
    return "\n".join(lines)
