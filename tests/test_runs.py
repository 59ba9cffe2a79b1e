import json

import pytest
import torch
from safetensors.torch import load_file

from mimco.errors import MimcoError
from mimco.runs import (
    BACKBONE,
    CHECKPOINT,
    backbone_state,
    backbones,
    is_finished,
    load_checkpoint,
    pick_encoder,
    read_summary,
    resume_path,
    resume_state,
    save_checkpoint,
    write_summary,
)


def _save(run, step, total):
    model = {"student.backbone.cls_token": torch.ones(1, 1, 4), "student.backbone.head.weight": torch.ones(2, 4),
             "student.mask_token": torch.zeros(1, 1, 4)}
    return save_checkpoint(run, "pretrain", step, total, model, {"backbone": "student.backbone."}, {}, {}, [],
                           {"method": "mimco"})


def test_checkpoint_round_trip_and_backbone_on_the_last_step(tmp_path):
    _save(tmp_path, 3, 10)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert (ckpt["stage"], ckpt["step"], ckpt["total_steps"]) == ("pretrain", 3, 10)
    assert not (tmp_path / BACKBONE).exists()
    _save(tmp_path, 10, 10)
    assert set(load_file(str(tmp_path / BACKBONE))) == {"cls_token"}  # no head, no mask token
    assert resume_state(tmp_path)["step"] == 10 and resume_path(tmp_path) == tmp_path / CHECKPOINT


def test_backbone_prefixes_recorded_or_by_stage_and_encoder(tmp_path):
    sd = {"momentum_encoder.a": torch.ones(1), "base_encoder.a": torch.zeros(1), "predictor.0.weight": torch.ones(1)}
    old = {"stage": "teacher", "model": sd}  # written before checkpoints recorded their encoders
    assert torch.equal(backbone_state(sd, pick_encoder("momentum", backbones(old), "x"))["a"], torch.ones(1))
    assert torch.equal(backbone_state(sd, pick_encoder("base", backbones(old), "x"))["a"], torch.zeros(1))
    with pytest.raises(MimcoError, match="unknown encoder 'ema' for a x; choose momentum or base"):
        pick_encoder("ema", backbones(old), "x")
    _save(tmp_path, 1, 2)
    new = load_checkpoint(tmp_path / CHECKPOINT)
    assert backbones(new) == {"backbone": "student.backbone."}
    assert pick_encoder("momentum", backbones(new), "x") == "student.backbone."  # one encoder: any name means it


def test_finished_means_the_whole_schedule(tmp_path):
    assert not is_finished(tmp_path) and resume_state(tmp_path) is None
    write_summary(tmp_path, {"step": 5, "total_steps": 10})
    assert not is_finished(tmp_path)
    write_summary(tmp_path, {"step": 5, "total_steps": 10, "stopped_by": "SIGTERM"})
    assert not is_finished(tmp_path)
    write_summary(tmp_path, {"step": 10, "total_steps": 10})
    assert is_finished(tmp_path) and json.loads((tmp_path / "summary.json").read_text())["step"] == 10


def test_foreign_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(MimcoError, match="not a mimco checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(MimcoError, match="nothing to resume"):
        resume_path(tmp_path / "none")


def test_every_stage_has_its_config_and_a_registered_method():
    from mimco.methods import get_method
    from mimco.pipeline import STAGE_CONFIGS
    from mimco.runs import STAGES

    assert tuple(STAGE_CONFIGS) == STAGES
    for stage, cls in STAGE_CONFIGS.items():
        assert get_method(cls().method, stage).stage == stage  # each stage's default method is registered for it


def test_a_summary_write_that_fails_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    """summary.json tells the SLURM script (and --resume) where a run is; a process killed while
    writing it must leave the previous one whole, not half a file."""
    import json

    write_summary(tmp_path, {"step": 5, "total_steps": 10})
    real = json.dumps

    def dies_midway(obj, f, **kw):
        text = real(obj, **kw)
        f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_summary(tmp_path, {"step": 10, "total_steps": 10})
    monkeypatch.undo()
    assert read_summary(tmp_path) == {"step": 5, "total_steps": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_run_lock_is_not_held_by_forked_workers(tmp_path):
    """Loader workers are forked while the lock is held: they must not keep it, or it would outlive
    release() (and the training process) for as long as a worker lives."""
    import os
    import time

    from mimco.runs import RunLock

    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    assert RunLock(tmp_path).acquire() is not None  # held: a second one is refused
    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives the release below (it starts after the fork hooks ran)
        os.write(tell, b"1")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        lock.release()
        again = RunLock(tmp_path)
        assert again.acquire() is None  # free while the child still runs
        again.release()
    finally:
        os.waitpid(child, 0)
