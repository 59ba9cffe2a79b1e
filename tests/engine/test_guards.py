"""The loop's guards: the stop vote taken every step, one step late, without a host sync."""

import torch

from mimco import distributed as dist
from mimco.engine.guards import StopSignal


def test_the_stop_vote_runs_every_step_and_lands_one_step_later(monkeypatch):
    """Distributed (mocked: another process asks to stop after its 3rd step): every call posts one
    all-reduce; the answer is the previous call's, so every process stops at the same step."""
    calls = []
    other = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # the other process's flag at each call

    def all_reduce_(x, op="sum"):
        assert op == "max" and x.device.type == "cpu"
        x.copy_(torch.maximum(x, torch.tensor([other[len(calls)]])))
        calls.append(float(x))
        return x

    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "all_reduce_", all_reduce_)
    stop = StopSignal()
    got = [stop.agreed(torch.device("cpu")) for _ in range(5)]
    assert calls == [0.0, 0.0, 1.0, 0.0, 0.0]  # one vote per step (the 3rd carries the request)
    assert got == [False, False, False, True, False]  # the 3rd step's vote, read after the 4th
    stop.requested = "SIGTERM"
    assert stop.agreed(torch.device("cpu")) is False and stop.agreed(torch.device("cpu")) is True


def test_alone_the_stop_flag_is_immediate():
    stop = StopSignal()
    assert stop.agreed(torch.device("cpu")) is False
    stop.requested = "SIGINT"
    assert stop.agreed(torch.device("cpu")) is True


def test_an_fp16_resume_of_a_bf16_checkpoint_starts_the_scaler_fresh(capsys):
    """A bf16/fp32 checkpoint holds a disabled scaler's empty state, which an enabled GradScaler
    refuses to load (a raw RuntimeError); the fp16 resume starts the scaler fresh instead."""
    import pytest

    from mimco.engine.trainer import restore_scaler

    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    with pytest.raises(RuntimeError):  # what the resume used to hit
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    restore_scaler(scaler, saved)
    assert scaler.get_scale() == 1024.0 and "gradient scaler starts fresh" in capsys.readouterr().err
    fp16 = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    fp16._lazy_init_scale_growth_tracker(torch.device("cpu"))
    resumed = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(resumed, fp16.state_dict())
    assert resumed.get_scale() == 8.0  # an fp16 checkpoint's scale is kept
    off = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(off, fp16.state_dict())  # fp16 -> bf16: ignored
    assert not off.is_enabled()
