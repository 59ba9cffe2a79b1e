"""log.csv, TensorBoard and W&B get the same rows (tensorboard's own reader checks the event files)."""

import csv
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimco.cli.main import main
from mimco.engine.logs import TENSORBOARD, WANDB_ID, scalars
from mimco.pipeline import open_run, run_stage
from tests.helpers import tiny_overrides, tiny_teacher_cfg


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


#: wandb's offline run file (``run-<id>.wandb``): its 7-byte header, then LevelDB log blocks of
#: records (4-byte checksum, 2-byte length, 1-byte type), each record a ``wandb_internal_pb2.Record``
WANDB_BLOCK, FULL, LAST = 32768, 1, 4


def _wandb_records(path):
    """The records of an offline run's ``.wandb`` file, in order (wandb keeps no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _offline_runs(run_dir):
    """Each offline W&B run written into ``run_dir`` (one per start), oldest first:
    (the run record, [(step, {key: value})] of its history)."""
    runs = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        records = _wandb_records(f)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = [(r.history.step.num, {k: json.loads(i.value_json) for i in r.history.item
                                         if not (k := i.key or "/".join(i.nested_key)).startswith("_")})
                   for r in records if r.WhichOneof("record_type") == "history"]  # "a/b" keys come nested
        runs.append((run, history))
    return runs


def _wandb_children():
    """This process's children that are wandb's service (wandb-core)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            name, fields = rest.rsplit(") ", 1)
        except (OSError, ValueError):
            continue
        if int(fields.split()[1]) == os.getpid() and "wandb" in name:
            found.append((int(pid), name))
    return found


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """The real wandb package, offline: every file it writes under tmp_path, and any attempt to reach
    a server sent to a closed local port; its service is stopped after the test."""
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": home, "WANDB_CONFIG_DIR": home / "config",
                       "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data", "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(key, str(value))
    yield wandb
    wandb.teardown()
    deadline = time.monotonic() + 10
    while _wandb_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _wandb_children() == []  # no wandb service left running after the run


@pytest.mark.slow
def test_wandb_offline_run_holds_the_log_rows_and_a_resumed_run_continues_it(tmp_path, offline_wandb):
    cfg = tiny_teacher_cfg(tmp_path, "w", ("train.wandb=myproject", "train.max_steps=4", "eval.every_steps=4",
                                          "eval.monitor_train=32", "eval.monitor_test=16"))
    run_stage("teacher", cfg)
    offline_wandb.teardown()  # its service stopped: the run's file written to its end (finish() may return before)
    run_dir = tmp_path / "w"
    run_id = json.loads((run_dir / WANDB_ID).read_text())["id"]
    [(run, history)] = _offline_runs(run_dir)
    assert run.run_id == run_id and run.project == "myproject" and run.display_name == "w"
    assert run.job_type == "teacher" and run.resume
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["wandb"] == "myproject" and config["model"]["arch"] == cfg.model.arch
    rows = _csv(run_dir / "log.csv")
    assert [s for s, _ in history] == [int(r["step"]) for r in rows]
    for (_, values), row in zip(history, rows):
        numbers = {k: v for k, v in values.items() if k.count("/") == 1 and not isinstance(v, dict)}  # not images
        want = {f"teacher/{k}": v for k, v in scalars({k: float(x) for k, x in row.items() if x}).items()}
        assert numbers.keys() == want.keys() and all(abs(numbers[k] - want[k]) <= 1e-9 * max(1, abs(want[k]))
                                                     for k in want)
    images = [(s, {f: v[f"teacher/{name}/{f}"] for f in ("_type", "size") if f"teacher/{name}/{f}" in v}
                or v.get(f"teacher/{name}", {})) for s, v in history for name in ("inputs", "features")]
    pictures = [(s, image["size"]) for s, image in images if image.get("_type") == "image-file"]
    assert [s for s, _ in pictures] == [4, 4] and all(size > 0 for _, size in pictures)  # the monitor's, as W&B images

    cfg, resume, run_dir = open_run("teacher", None, ["train.max_steps=6"], str(run_dir / "last.pt"))
    run_stage("teacher", cfg, resume, run_dir)
    offline_wandb.teardown()
    first, second = _offline_runs(run_dir)
    assert second[0].run_id == first[0].run_id == run_id and second[0].resume  # the same W&B run, resumed
    rows = _csv(run_dir / "log.csv")
    assert [s for s, v in second[1] if any(k.endswith("/loss") for k in v)] == [int(r["step"]) for r in rows
                                                                                  if int(r["step"]) > 4]


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    code = main(["teacher", *tiny_overrides(tmp_path, "x"), "train.wandb=proj"])
    err = capsys.readouterr().err
    assert code == 2 and "train.wandb=proj needs the wandb package" in err and "pip install wandb" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
