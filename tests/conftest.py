"""The suite's fixtures (builders and settings they share with the test modules: ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import MONITORED, tiny_pretrain_cfg, tiny_teacher_cfg


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


@pytest.fixture(scope="session")
def monitored_run(tmp_path_factory, teacher_ckpt) -> Path:
    """A tiny MimCo run of 3 epochs (8 steps each) with :data:`MONITORED`, trained once; its folder."""
    from mimco.pipeline import run_stage

    out = tmp_path_factory.mktemp("monitored")
    run_stage("pretrain", tiny_pretrain_cfg(out, teacher_ckpt, "run", MONITORED))
    return out / "run"
