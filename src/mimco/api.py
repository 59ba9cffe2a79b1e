"""The Python API: what ``import mimco`` offers (docs/python.md). Each function is what a command
does, without the command line: the same configs, runs, checkpoints and numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mimco.errors import MimcoError


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The typed config of ``stage`` (teacher | pretrain | finetune | segfinetune): defaults, then
    the YAML file ``path`` (or a bundled config's name, e.g. ``"fmnist_pretrain"``), then
    ``key=value`` overrides, checked as the commands check them."""
    from mimco.config import load_config as _load
    from mimco.pipeline import STAGE_CONFIGS

    if stage not in STAGE_CONFIGS:
        raise MimcoError(f"unknown stage '{stage}'; choose {', '.join(STAGE_CONFIGS)}")
    return _load(STAGE_CONFIGS[stage], path, overrides)


def load_backbone(path: str | Path, encoder: str = "momentum", img_size: int = 0) -> torch.nn.Module:
    """The backbone of any checkpoint mimco reads (a run's ``last.pt`` or snapshot, an exported or
    hub folder, timm/safetensors, MoCo v3, DINO, MAE, DINOv2, CLIP, ...) as a timm model without
    classifier; ``img_size``: another input side (the position table resampled), 0 = its own."""
    from mimco.models.formats import load_backbone as _load

    return _load(str(path), encoder, img_size)[0]


def train(cfg: Any, backbone: str | Path | torch.nn.Module | None = None,
          resume: str | Path | None = None) -> dict[str, Any]:
    """Run the stage of ``cfg`` (from :func:`load_config`) as its command does and return its
    summary (steps, losses, k-NN, the run folder). Fine-tuning stages train ``backbone`` (a
    checkpoint path or a model). ``resume``: a ``last.pt``, or ``"auto"`` for the one in
    ``cfg.train.out_dir/cfg.train.name``; the run continues under ``cfg``, which may change what a
    resume can change (a longer ``optim.epochs``, ``train.max_steps``), and nothing else."""
    from mimco.config_rules import check_resume
    from mimco.pipeline import STAGE_CONFIGS, resume_checkpoint, run_dir_for, run_stage

    stage = getattr(type(cfg), "STAGE", None)  # the stage's class or its method's (mimco.config.stage_class)
    if stage not in STAGE_CONFIGS:
        raise MimcoError(f"{type(cfg).__name__} is not a stage config; build one with mimco.load_config(stage, ...)")
    state, run_dir = None, run_dir_for(cfg, stage, False) if resume is None else None
    if resume is not None:
        state, run_dir = resume_checkpoint(stage, cfg, resume)
        check_resume(state["config"], cfg)  # what a resume cannot change (the data, the model, the seed) is refused
    inputs: dict[str, Any] = {}
    if stage in ("finetune", "segfinetune"):
        if backbone is None:
            raise MimcoError(f"the {stage} stage trains a backbone: pass backbone=PATH or a model")
        part = cfg.classifier if stage == "finetune" else cfg.head
        inputs["backbone"] = (load_backbone(backbone, part.encoder, cfg.data.img_size)
                              if isinstance(backbone, (str, Path)) else backbone)
    return run_stage(stage, cfg, state, run_dir, **inputs)


def _split(cfg: Any, split: str) -> Any:
    from mimco.data.build import load_dataset

    if split not in ("train", "test"):
        raise MimcoError(f"unknown split '{split}'; choose train or test")
    if (data := load_dataset(cfg.data, train=split == "train")) is None:
        raise MimcoError(f"data.name={cfg.data.name} has no {split} split")
    return data


def extract_features(model: torch.nn.Module, cfg: Any, split: str = "test", patch: bool = False) -> dict[str, Any]:
    """Frozen features of ``split`` of ``cfg``'s data (``cfg.train`` gives device and precision):
    ``cls`` (N, D), ``mean`` (N, D), with ``patch`` also ``patch`` (N, L, D), ``labels`` (N,),
    ``index`` (N,) and ``names`` (file paths, [] for in-memory data), as ``mimco extract`` writes
    them."""
    from mimco.eval.extract import extract_tokens
    from mimco.pipeline import setup

    device = setup(cfg, model_keys=False)
    return extract_tokens(model.to(device), _split(cfg, split), cfg.data, device, cfg.train.precision, patch,
                          progress=False) or {}


def knn(model: torch.nn.Module, cfg: Any, k: int = 20, temperature: float = 0.07, monitor: bool = False) -> float:
    """Weighted k-NN top-1 (%) of ``model``'s CLS features: the test split against the training
    split of ``cfg``'s data, as ``mimco knn`` scores it; ``monitor``: on the k-NN monitor's subsets
    (``cfg.eval.monitor_*``), as ``mimco knn --monitor``."""
    from mimco.eval.features import extract_features as _extract
    from mimco.eval.knn import knn_accuracy
    from mimco.eval.monitor import monitor_splits
    from mimco.pipeline import setup

    device = setup(cfg, model_keys=False)
    train, test = _split(cfg, "train"), _split(cfg, "test")
    if monitor:
        train, test = monitor_splits(train, test, cfg.eval)
    model = model.to(device)
    return knn_accuracy(*_extract(model, train, cfg.data, device), *_extract(model, test, cfg.data, device), k,
                        temperature)


def probe(model: torch.nn.Module | None, cfg: Any, protocols: str | list[str] = "knn",
          **options: dict[str, Any]) -> dict[str, float]:
    """Registered evaluation protocols (``knn``, ``linear``, ``few`` or a plugin's) on ``model``'s
    frozen features (None: raw pixels) under ``cfg``'s data and ``eval`` keys, as ``mimco probe``
    scores them; ``options``: a protocol's options by its name (``NAME={"key": value}``)."""
    from mimco.eval.protocols import Probe, protocol_options, run_protocols
    from mimco.pipeline import setup

    names = [protocols] if isinstance(protocols, str) else list(protocols)
    opts = {n: protocol_options(n, options.get(n)) for n in names}
    if unknown := sorted(set(options) - set(names)):
        raise MimcoError(f"options for {', '.join(unknown)}, which is not among the protocols {names}")
    device = setup(cfg, model_keys=False)
    p = Probe(model.to(device) if model is not None else None, cfg.data, (_split(cfg, "train"), _split(cfg, "test")),
              cfg.eval, device, cfg.train.precision, cfg.train.seed)
    return run_protocols(names, p, opts)


def study(spec: str | Path, out: str | Path, *overrides: str) -> str:
    """``mimco study``: the spec (a YAML file or a bundled name, e.g. ``"demo"``) with command-line
    style ``overrides`` (``KEY=VALUE``, ``RUN:KEY=VALUE``, ``PROTOCOL.key=value``), its runs trained
    or reused in ``out``, every row scored; returns the table (Markdown), also in ``out/results.md``."""
    from mimco.studies import load_spec, run_study, with_overrides

    return run_study(with_overrides(load_spec(spec), overrides), Path(out))


def export(checkpoint: str | Path, out: str | Path, encoder: str = "momentum") -> Path:
    """``mimco export``: the backbone of ``checkpoint`` as a timm hub folder with a model card,
    which ``timm.create_model(f"local-dir:{out}", pretrained=True)`` builds."""
    from mimco.models.export import export_checkpoint

    return export_checkpoint(checkpoint, out, encoder)[0]
