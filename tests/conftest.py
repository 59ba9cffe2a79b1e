"""Shared fixtures: tiny configs on the procedural dataset so every test runs in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny MoCo v3 teacher trained once for the whole session."""
    from mimco.pipeline import run_stage

    out = tmp_path_factory.mktemp("teacher_run")
    run_stage("teacher", tiny_teacher_cfg(out))
    return out / "teacher" / "last.pt"
