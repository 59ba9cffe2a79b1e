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
