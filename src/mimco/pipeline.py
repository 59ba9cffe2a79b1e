"""The stage runner: every stage (teacher, pretrain, finetune, segfinetune) of every caller (the CLI, ``mimco
demo``, the study) is built and run here: device, run folder, batches, the registered method,
the engine, the end-of-run evaluation; and resume, reuse-if-finished and a stop that stops the
whole pipeline (:func:`run_or_reuse`)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mimco import distributed as dist
from mimco.config import (
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    SegmentationConfig,
    TeacherStageConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from mimco.config_rules import check_resume, validate
from mimco.data.build import load_dataset
from mimco.data.stream import build_stream
from mimco.engine.rng import seed_process
from mimco.engine.sharding import gathered
from mimco.engine.trainer import Trainer
from mimco.errors import MimcoError
from mimco.eval import finetune as _finetune  # noqa: F401  (registers the fine-tuning method)
from mimco.eval import segfinetune as _segfinetune  # noqa: F401  (registers segmentation fine-tuning)
from mimco.eval.monitor import KnnMonitor
from mimco.eval.probe import has_labels
from mimco.eval.protocols import (
    Probe,
    SegDataOptions,
    cell,
    get_protocol,
    register_protocol,
    run_protocols,
    segmentation_config,
)
from mimco.methods import get_method
from mimco.models.init_from import init_encoders
from mimco.runs import (
    CHECKPOINT,
    CONFIG,
    RunLock,
    finished,
    is_finished,
    load_checkpoint,
    read_summary,
    resume_path,
    resume_state,
    write_summary,
)

#: each stage's config class (``mimco teacher | pretrain | finetune | segfinetune``)
STAGE_CONFIGS: dict[str, type] = {"teacher": TeacherStageConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
                                  "segfinetune": SegmentationConfig}


def setup(cfg: Any, model_keys: bool = True) -> torch.device:
    """Threads, device, process group and seeds, after the config's rules (already checked when the
    config was loaded; again here for configs built in Python). ``model_keys=False``: an evaluation
    of a checkpoint's backbone, whose geometry is its own (:func:`~mimco.config_rules.validate`)."""
    validate(cfg, model_keys)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif t.device.startswith("cuda") and not torch.cuda.is_available():
        raise MimcoError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    else:
        device = torch.device(t.device)
    if t.precision == "fp16" and device.type != "cuda":
        raise MimcoError("train.precision=fp16 needs a CUDA device; on the CPU use train.precision=bf16")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    set_tf32(device, t.tf32)
    dist.init_from_env(device, t.init_distributed, t.dist_timeout_minutes)
    torch.manual_seed(t.seed)  # the same on every process: models start identical (FSDP shards local weights)
    return device


def set_tf32(device: torch.device, on: bool) -> None:
    """On CUDA, fp32 matmuls and convolutions on TF32 tensor cores (``train.tf32``; bf16/fp16 autocast
    regions are unaffected). Set through the ``allow_tf32`` flags, which every reader of the setting
    in torch (``get_float32_matmul_precision``, inductor, the newer ``fp32_precision``) agrees with;
    the CPU's matmuls are left alone."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def run_dir_for(cfg: Any, stage: str, resuming: bool) -> Path:
    """``train.out_dir/train.name`` (or ``<stage>-<time>``); refuses to start over a run's checkpoint.
    The folder is made once the stage has been built, so a refused command leaves none behind."""
    name = cfg.train.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    d = Path(cfg.train.out_dir) / name
    if not resuming and (d / CHECKPOINT).exists():
        raise MimcoError(f"{d} already holds a run; pass --resume auto to continue it or choose another train.name")
    return d


def run_stage(stage: str, cfg: Any, resume: dict[str, Any] | None = None, run_dir: Path | None = None,
              **inputs: Any) -> dict[str, Any]:
    """Train one stage end to end with the method its config names (``cfg.method``, looked up in
    :mod:`mimco.methods.registry` before anything is built) and return its summary (also written to
    the run folder). ``inputs`` go to the method's builder (fine-tuning: ``backbone``)."""
    spec = get_method(cfg.method, stage)
    ev = getattr(cfg, "eval", None)
    for name in ev.protocols if ev is not None and ev.at_end else []:  # a name nothing registers: before any data
        get_protocol(name)
    device = setup(cfg)
    run_dir = run_dir or run_dir_for(cfg, stage, resume is not None)
    stream = build_stream(cfg, device, spec.views)
    method = spec.build(cfg, device, stream=stream, run_dir=run_dir, **inputs)
    if getattr(cfg, "model", None) is not None and cfg.model.init_from and resume is None:  # continued pre-training
        report = init_encoders(method, cfg.model.init_from)
        if dist.is_main():
            print(report, file=sys.stderr, flush=True)
    monitor = KnnMonitor(cfg) if ev is not None and (ev.every_epochs or ev.every_steps) else None
    seed_process(cfg.train.seed * 1000 + dist.rank() + 1)  # per-process streams for augmentation and drop path
    lock, held, failed = RunLock(run_dir), None, None
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if (held := lock.acquire()) is None:
                save_config(cfg, run_dir / CONFIG)
        except OSError as e:  # an unwritable folder: said by every process, none left waiting in the broadcast
            lock.release()
            failed = e
    verdict = dist.broadcast_(torch.tensor([2.0 if failed else float(held is not None)], device=device)).item()
    if verdict == 2:
        raise MimcoError(f"cannot write the run folder {run_dir}: {failed or 'see the main process'}; choose a "
                         "writable train.out_dir")
    if verdict:  # every process stops here, before anything in the folder is written
        raise MimcoError(f"{held or 'another process'} is training in {run_dir}; wait for it to end (or stop it), "
                         "or choose another train.name")
    # the verdict's broadcast (read back on every process) also says the folder exists: no barrier needed
    try:
        summary = Trainer(method, cfg, stream, run_dir, stage, device, resume, monitor).fit()
        summary["epochs"] = round(summary["step"] / stream.steps_per_epoch, 4)
        summary["run_dir"] = str(run_dir)
        if ev is not None and ev.at_end and finished(summary):  # every process extracts its share; rank 0 scores
            splits = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
            if has_labels(*splits):
                with gathered(method):  # FSDP: the backbone's parameters, whole on every process, for forward_features
                    probe = Probe(method.backbone(), cfg.data, splits, cfg.eval, device, cfg.train.precision,
                                  cfg.train.seed)
                    summary.update(run_protocols(cfg.eval.protocols, probe))
        if dist.is_main():
            write_summary(run_dir, summary)
        dist.barrier()  # as after a checkpoint: none exits before it is written (at a stop, Slurm may kill the rest)
        return summary
    finally:
        lock.release()  # after the summary is written


class StageStopped(MimcoError):
    """A stage stopped before the end of its schedule (SIGTERM, Ctrl-C): its checkpoint is written,
    and what comes after it in a pipeline must not run. ``exit_code``: 130 for SIGINT, else 143."""

    def __init__(self, stage: str, summary: dict[str, Any]) -> None:
        self.stage, self.summary = stage, summary
        self.exit_code = 130 if summary.get("stopped_by") == "SIGINT" else 143
        super().__init__(f"the {stage} stage was stopped by {summary['stopped_by']} at step {summary['step']}/"
                         f"{summary['total_steps']}; its checkpoint {summary['checkpoint']} is written")


def run_or_reuse(stage: str, cfg: Any, run_dir: Path, say: str = "mimco", **inputs: Any) -> dict[str, Any]:
    """A stage of a pipeline (``mimco demo``, the study): reuse its finished run in ``run_dir``, resume
    an interrupted one (whose fixed keys must match ``cfg``), or train it; raise
    :class:`StageStopped` when it stops before its end, so nothing runs on an unfinished model."""
    if is_finished(run_dir):
        print(f"[{say}] {stage}: reusing the finished run in {run_dir}", file=sys.stderr, flush=True)
        return read_summary(run_dir)
    if (resume := resume_state(run_dir)) is not None:
        check_resume(resume["config"], cfg)
    print(f"[{say}] {stage}: {'resuming' if resume else 'training'} in {run_dir}", file=sys.stderr, flush=True)
    summary = run_stage(stage, cfg, resume, run_dir, **inputs)
    if "stopped_by" in summary:
        raise StageStopped(stage, summary)
    return summary


@dataclass
class FinetuneOptions:
    """The ``finetune`` protocol's recipe: ``mimco finetune`` overrides on the probe's data keys."""

    overrides: list[str] = field(default_factory=list)  # e.g. [optim.epochs=1, data.labels_per_class=10]


def finetune_config(data: DataConfig, overrides: list[str]) -> FinetuneConfig:
    """The fine-tuning config of ``data`` and ``overrides`` (no progress bar)."""
    cfg = load_config(FinetuneConfig, None, ["train.progress=false"])
    cfg.data = replace(data)
    return apply_overrides(cfg, [*overrides, "train.progress=false"])


def _tuned(stage: str, cfg: Any, probe: Probe, backbone: torch.nn.Module) -> dict[str, Any]:
    """The summary of ``stage`` run on ``backbone`` in ``probe.folder/<stage>-<hash of cfg>`` (a
    changed recipe trains again), a finished one reused."""
    if probe.folder is None:
        raise MimcoError(f"the {stage} protocol needs a folder for its run; give the probe one (--out)")
    key = hashlib.sha256(yaml.safe_dump(to_dict(cfg)).encode()).hexdigest()[:8]
    cfg.train.out_dir, cfg.train.name = str(probe.folder), f"{stage}-{key}"
    return run_or_reuse(stage, cfg, probe.folder / cfg.train.name, say=stage, backbone=backbone)


def _finetune_column(opts: FinetuneOptions) -> str:
    few = [o.split("=", 1)[1] for o in opts.overrides if o.startswith("data.labels_per_class=")]
    return f"fine-tune{f' {few[-1]}/class' if few and few[-1] != '0' else ''}"


@register_protocol("finetune", options=FinetuneOptions,
                   columns=lambda runs, opts, ev: {_finetune_column(opts): cell([m["finetune_top1"] for m in runs
                                                                                 if "finetune_top1" in m])},
                   note=lambda opts, ev: f"{_finetune_column(opts)}: top-1 after `mimco finetune "
                                         f"{' '.join(opts.overrides)}`")
def finetune_protocol(probe: Probe, opts: FinetuneOptions) -> dict[str, float]:
    """Fine-tune the backbone (every layer, ``mimco finetune``'s recipe with ``opts.overrides``) in
    ``probe.folder/finetune-<hash>``, a finished one reused; its test top-1. Raw pixels: nothing."""
    if probe.backbone is None:
        return {}
    res = _tuned("finetune", finetune_config(probe.data, opts.overrides), probe, probe.backbone)
    return {"finetune_top1": res["top1"], "finetune_seconds": res["train_seconds"]}


@dataclass
class SegfinetuneOptions(SegDataOptions):
    """The ``segfinetune`` protocol's data (as ``segprobe``'s) and recipe (``mimco segfinetune`` overrides)."""

    overrides: list[str] = field(default_factory=list)  # e.g. [optim.epochs=5, optim.batch_size=64]


@register_protocol("segfinetune", options=SegfinetuneOptions,
                   columns=lambda runs, opts, ev: {"fine-tune mIoU": cell([m["segfinetune_miou"] for m in runs
                                                                          if "segfinetune_miou" in m])},
                   note=lambda opts, ev: f"fine-tune mIoU: `mimco segfinetune {' '.join(opts.overrides)}` on the "
                                         f"segmentation data at {opts.img_size} px")
def segfinetune_protocol(probe: Probe, opts: SegfinetuneOptions) -> dict[str, float]:
    """Segmentation fine-tuning of the backbone at ``opts.img_size`` (every layer) in
    ``probe.folder/segfinetune-<hash>``, a finished one reused; its validation mIoU. Raw pixels: nothing."""
    if probe.backbone is None:
        return {}
    cfg = segmentation_config(probe.data, opts, [*opts.overrides, "train.progress=false"])
    res = _tuned("segfinetune", cfg, probe, probe.backbone_at(opts.img_size))
    return {"segfinetune_miou": res["miou"], "segfinetune_seconds": res["train_seconds"]}


def resume_checkpoint(stage: str, cfg: Any, resume: str | Path) -> tuple[dict[str, Any], Path]:
    """(the run checkpoint to resume, its run folder): ``resume`` is a ``last.pt``, or ``auto`` for
    ``cfg.train.out_dir/cfg.train.name/last.pt``; refused when another stage wrote it."""
    if str(resume) == "auto":
        if not cfg.train.name:
            raise MimcoError("--resume auto needs the run's folder: set train.name=<run name> (and train.out_dir)")
        resume = resume_path(Path(cfg.train.out_dir) / cfg.train.name)
    state = load_checkpoint(resume)
    if state["stage"] != stage:
        raise MimcoError(f"{resume} is a '{state['stage']}' checkpoint; resume it with `mimco {state['stage']}`")
    return state, Path(resume).parent


def open_run(stage: str, config: str | None, overrides: list[str] | tuple[str, ...],
             resume: str | None) -> tuple[Any, dict[str, Any] | None, Path | None]:
    """A stage command's (config, checkpoint to resume or None, run folder or None for a new one).
    ``resume``: as :func:`resume_checkpoint`'s; a resumed run takes its saved config, then
    ``overrides`` (``train.max_steps`` back to 0 unless given), and refuses changes to the keys fixed
    on resume (:func:`~mimco.config_rules.fixed_keys`)."""
    cls = STAGE_CONFIGS[stage]
    if not resume:
        return load_config(cls, config, overrides), None, None
    state, run_dir = resume_checkpoint(stage, load_config(cls, config, overrides) if resume == "auto" else None, resume)
    saved_init = (state["config"].get("model") or {}).get("init_from", "")
    for o in overrides:  # the same value (a requeued job repeating its command) is the run's own: not loaded again
        key, _, value = o.partition("=")
        if key.strip() == "model.init_from" and value.strip() != saved_init:
            raise MimcoError(f"model.init_from does not apply on resume: the checkpoint already holds the weights (its "
                             f"run started from {saved_init or 'no file'!r}); drop the override (or start a new run "
                             "from the file with another train.name)")
    cfg = from_dict(cls, state["config"])
    cfg.train.max_steps = 0  # continue to the end of the schedule unless told otherwise below
    cfg = apply_overrides(cfg, overrides)
    check_resume(state["config"], cfg)
    return cfg, state, run_dir
