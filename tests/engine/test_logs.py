"""log.csv, TensorBoard and W&B get the same rows (tensorboard's own reader checks the event files)."""

import csv
import importlib.machinery
import shutil
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimco.cli.main import main
from mimco.engine.logs import TENSORBOARD, scalars
from mimco.pipeline import open_run, run_stage
from tests.conftest import tiny_overrides, tiny_teacher_cfg


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _events(run_dir, stage):
    acc = EventAccumulator(str(run_dir / TENSORBOARD), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {tag[len(stage) + 1:]: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same_as_csv(rows, tb):
    """Every numeric log.csv cell is one TensorBoard scalar at the row's step (float32 in events)."""
    cells = 0
    for key in rows[0]:
        if key == "step":
            continue
        want = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
        got = tb.get(key, [])
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want)), key
        cells += len(want)
    assert cells and set(tb) <= set(rows[0])
    return cells


@pytest.mark.slow
def test_tensorboard_holds_every_scalar_of_the_log(monitored_run):
    rows = _csv(monitored_run / "log.csv")
    acc, tb = _events(monitored_run, "pretrain")
    _same_as_csv(rows, tb)
    assert {"loss", "lr", "images_per_s", "knn_monitor"} <= set(tb)
    assert [s for s, _ in tb["knn_monitor"]] == [8, 16, 24]  # each epoch's monitor point
    images = acc.Tags()["images"]
    assert {"pretrain/inputs", "pretrain/features"} <= set(images)
    shown = acc.Images("pretrain/inputs")
    assert [e.step for e in shown] == [8, 16, 24]
    assert shown[0].height > acc.Images("pretrain/features")[0].height // 2  # inputs: the image and its masked copy


@pytest.mark.slow
def test_a_resumed_run_hides_the_rows_past_its_checkpoint(tmp_path):
    """Resumed from an earlier checkpoint (a crash after it), log.csv drops the later rows and
    TensorBoard's purge_step hides them: the reader sees each step once, with the new values."""
    cfg = tiny_teacher_cfg(tmp_path, "t", ("optim.epochs=2", "train.max_steps=8", "train.log_every=2"))
    run_stage("teacher", cfg)
    run = tmp_path / "t"
    shutil.copy(run / "last.pt", tmp_path / "step8.pt")
    cfg, resume, run_dir = open_run("teacher", None, [], str(run / "last.pt"))
    run_stage("teacher", cfg, resume, run_dir)  # to step 16
    shutil.copy(tmp_path / "step8.pt", run / "last.pt")  # as if it had crashed after step 8's checkpoint
    cfg, resume, run_dir = open_run("teacher", None, ["optim.base_lr=3e-3"], str(run / "last.pt"))
    run_stage("teacher", cfg, resume, run_dir)
    rows = _csv(run / "log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    _, tb = _events(run, "teacher")
    _same_as_csv(rows, tb)


class _FakeWandb(types.ModuleType):
    """The parts of wandb the logger calls, recording them."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls = []
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")
        self.Image = lambda array: ("image", array.shape)

    def init(self, **kw):
        self.calls.append(("init", kw))
        log = lambda values, step: self.calls.append(("log", step, values))  # noqa: E731
        return types.SimpleNamespace(log=log, finish=lambda: self.calls.append(("finish",)))


@pytest.mark.slow
def test_wandb_gets_the_rows_of_the_log_and_keeps_its_id_on_resume(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_teacher_cfg(tmp_path, "w", ("train.wandb=myproject", "train.max_steps=4", "eval.every_steps=4",
                                          "eval.monitor_train=32", "eval.monitor_test=16"))
    run_stage("teacher", cfg)
    inits = [c[1] for c in fake.calls if c[0] == "init"]
    assert inits[0]["project"] == "myproject" and inits[0]["id"] == "abc123" and inits[0]["resume"] == "allow"
    assert inits[0]["config"]["train"]["wandb"] == "myproject"
    logged = [(c[1], c[2]) for c in fake.calls if c[0] == "log"]
    rows = _csv(tmp_path / "w" / "log.csv")
    numbers = [(s, v) for s, v in logged if not any(isinstance(x, tuple) for x in v.values())]
    assert [s for s, _ in numbers] == [int(r["step"]) for r in rows]
    for (_, values), row in zip(numbers, rows):
        assert values == {f"teacher/{k}": v for k, v in scalars({k: float(x) for k, x in row.items() if x}).items()}
    assert any("teacher/features" in v for _, v in logged)  # the monitor's pictures
    assert fake.calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "other"
    cfg, resume, run_dir = open_run("teacher", None, ["train.max_steps=6"], str(tmp_path / "w" / "last.pt"))
    run_stage("teacher", cfg, resume, run_dir)
    assert [c[1]["id"] for c in fake.calls if c[0] == "init"] == ["abc123", "abc123"]  # the same W&B run


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    code = main(["teacher", *tiny_overrides(tmp_path, "x"), "train.wandb=proj"])
    err = capsys.readouterr().err
    assert code == 2 and "train.wandb=proj needs the wandb package" in err and "pip install wandb" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
