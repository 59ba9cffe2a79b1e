"""The class of failure NCCL shows and gloo forgives: a collective handed a tensor that is not on
the process group's device. A mocked NCCL backend makes the CPU suite see it."""

import pytest
import torch

from mimco import distributed as dist
from tests.helpers import registered, registered_names


@pytest.fixture
def nccl(monkeypatch):
    """A 2-process NCCL group as far as mimco can tell; the collectives record what they get."""
    seen = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "backend", lambda: "nccl")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append(("all_reduce", t.device.type)))
    monkeypatch.setattr(torch.distributed, "all_gather", lambda out, t: seen.append(("all_gather", t.device.type)))
    return seen


def test_collectives_refuse_cpu_tensors_under_nccl(nccl):
    for call in (lambda: dist.all_reduce_mean(torch.ones(2)), lambda: dist.gather_no_grad(torch.ones(2, 3)),
                 lambda: dist.all_reduce_(torch.ones(1), "max"),
                 lambda: dist.mean_over_processes({"momentum": torch.tensor(0.99)}, torch.device("cpu")),
                 lambda: dist.mean_over_processes({"momentum": 0.99}, torch.device("cpu"))):
        with pytest.raises(RuntimeError, match="NCCL takes CUDA tensors only"):
            call()
    assert nccl == []  # refused before the backend saw anything


def test_gloo_takes_cpu_tensors(monkeypatch):
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.mul_(2))  # the other process: same values
    got = dist.mean_over_processes({"a": torch.tensor(1.5), "b": torch.tensor([2.0]), "m": 0.25}, torch.device("cpu"))
    assert got == {"a": 1.5, "b": 2.0, "m": 0.25}  # a Python number (MoCo's momentum) joins the same all-reduce


@pytest.mark.parametrize("stage,name", registered_names())
def test_logged_values_live_on_the_loss_device(stage, name, teacher_ckpt):
    """Run each method on the meta device (a stand-in for CUDA): every logged value must be on
    the loss's device, where the trainer's one all-reduce of the log row takes it."""
    method, n_views = registered(stage, name, teacher_ckpt), 2 if stage == "teacher" else 1
    method.total_steps = 10
    method = method.to("meta")
    views = [torch.empty(4, 3, 16, 16, device="meta") for _ in range(n_views)]
    loss, logs = method(views, 3, 0)
    assert loss.device.type == "meta"
    for k, v in logs.items():  # a Python number is allowed too: it reaches the device only at the log row
        if isinstance(v, torch.Tensor):
            assert v.device == loss.device, f"{name} logs '{k}' on {v.device}, its loss is on {loss.device}"
        else:
            assert isinstance(v, float), f"{name} logs '{k}' as {type(v)}"


def test_an_nccl_barrier_names_this_process_gpu(nccl, monkeypatch):
    """NCCL runs a barrier on a GPU; left to guess, it may pick another process's (and warn)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.distributed, "barrier", lambda device_ids=None: nccl.append(("barrier", device_ids)))
    dist.barrier()
    assert nccl == [("barrier", [3])]
