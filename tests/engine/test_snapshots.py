"""Epoch snapshots: kept beside last.pt, pruned to train.keep_last, each a resumable checkpoint whose
backbone exports like last.pt's."""

import os

import pytest
import torch

from mimco.cli.main import main
from mimco.runs import load_checkpoint, prune_snapshots, snapshot_path, snapshots
from tests.helpers import tiny_overrides


@pytest.mark.slow
def test_the_newest_snapshots_are_kept_and_hold_their_epoch(monitored_run):
    kept = snapshots(monitored_run)
    assert [p.name for p in kept] == ["epoch_0002.pt", "epoch_0003.pt"]  # keep_last=2 of 3 epochs
    two, last = load_checkpoint(kept[0]), load_checkpoint(monitored_run / "last.pt")
    assert two["step"] == 16 and load_checkpoint(kept[1])["step"] == last["step"] == 24
    assert any(not torch.equal(two["model"][k], last["model"][k]) for k in last["model"])  # epoch 2's own weights
    assert not any(p.name.endswith(".tmp") for p in monitored_run.iterdir())


@pytest.mark.slow
def test_a_snapshot_exports_like_last_pt(monitored_run, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["export", str(monitored_run / "epoch_0002.pt"), "--out", str(tmp_path / "e2")]) == 0
    ckpt = load_checkpoint(monitored_run / "epoch_0002.pt")
    prefix = next(iter(ckpt["backbones"].values()))
    got = load_file(str(tmp_path / "e2" / "model.safetensors"))
    want = {k[len(prefix):]: v for k, v in ckpt["model"].items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    card = (tmp_path / "e2" / "README.md").read_text()
    assert "step 16 of 24" in card and "k-NN monitor" not in card  # the summary is the final weights'


def test_pruning_keeps_the_newest_by_epoch_number(tmp_path):
    for e in (1, 2, 10, 11):
        snapshot_path(tmp_path, e).write_text("x")
    (tmp_path / "epoch_notanumber.pt").write_text("x")
    gone = prune_snapshots(tmp_path, 2)
    assert [p.name for p in gone] == ["epoch_0001.pt", "epoch_0002.pt"]
    assert [p.name for p in snapshots(tmp_path)] == ["epoch_0010.pt", "epoch_0011.pt"]
    assert prune_snapshots(tmp_path, -1) == [] and len(snapshots(tmp_path)) == 2


@pytest.mark.slow
def test_a_snapshot_is_not_changed_by_the_next_checkpoint(monitored_run):
    """The snapshot is a hard link (or copy) of last.pt; the next atomic last.pt replaces the name,
    so the snapshot keeps its bytes."""
    a = snapshots(monitored_run)[0]
    assert os.stat(a).st_ino != os.stat(monitored_run / "last.pt").st_ino


def test_keep_last_zero_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(["teacher", *tiny_overrides(tmp_path, "k"), "train.keep_every_epochs=1", "train.keep_last=0"])
    err = capsys.readouterr().err
    assert code == 2 and "train.keep_last=0 is out of range" in err and "train.keep_every_epochs=0" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "k").exists()
    assert main(["teacher", *tiny_overrides(tmp_path, "k"), "train.keep_last=-2"]) == 2
    assert "train.keep_last=-2 is out of range" in capsys.readouterr().err


def test_snapshots_fall_on_whole_epochs_only():
    """Every N-th whole epoch; the fractional end of a 2.5-epoch schedule is not epoch 2 again."""
    from types import SimpleNamespace

    from mimco.engine.trainer import Trainer

    t = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(keep_every_epochs=2)),
                        stream=SimpleNamespace(steps_per_epoch=8))
    due = []
    for step in range(1, 21):
        t.step = step
        if Trainer._snapshot_due(t):
            due.append(step)
    assert due == [16]
