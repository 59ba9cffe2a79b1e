"""torch.distributed helpers; everything degrades to single-process when not initialised."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def local_processes() -> tuple[int, int]:
    """(this process's rank on its node, processes on the node): torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE, (0, 1) outside it."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init_from_env(device: torch.device, always: bool = False, timeout_minutes: float = 120) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, or ``always`` with the
    variables torchrun sets): NCCL on CUDA, gloo on the CPU. ``timeout_minutes``: how long a
    collective waits for the slowest process before the run fails (``train.dist_timeout_minutes``;
    NCCL's own default, 10 minutes, is shorter than a node decoding ``data.cache`` alone)."""
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or (always and launched)) and not is_dist():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))


def backend() -> str:
    return str(dist.get_backend()) if is_dist() else ""


def check_collective(x: torch.Tensor) -> torch.Tensor:
    """Refuse a tensor the process group's backend cannot take, before the backend does.

    NCCL only takes CUDA tensors (a CPU tensor fails there, often only at the first log row);
    gloo takes CPU tensors. Every collective here passes through this check, so the CPU tests
    (with a mocked backend) catch what a GPU run would hit."""
    if backend() == "nccl" and x.device.type != "cuda":
        raise RuntimeError(f"a {x.device.type} tensor {tuple(x.shape)} was handed to an NCCL collective; "
                           "NCCL takes CUDA tensors only: create logged values on the loss's device")
    return x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0, without gradient.
    Every process must pass the same B (the batch stream keeps batches equal)."""
    if not is_dist():
        return x
    check_collective(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather_to_main(x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every process's ``x`` (n_r, ...) on the main process, a list in rank order (on ``x``'s device), None elsewhere;
    the n_r may differ, the other dimensions may not. Only the main process receives: the others keep nothing
    (``torch.distributed.gather``, not an all-gather). Alone: ``[x]``."""
    if not is_dist():
        return [x]
    check_collective(x)
    sizes = gather_no_grad(torch.tensor([len(x)], device=x.device)).tolist()  # every n_r, to pad alike
    most = max(sizes)
    pad = x if len(x) == most else torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(pad) for _ in sizes] if is_main() else None
    dist.gather(pad.contiguous(), parts, dst=0)
    return None if parts is None else [p[:n] for p, n in zip(parts, sizes)]


def broadcast_(x: torch.Tensor) -> torch.Tensor:
    """In-place broadcast of the main process's ``x`` to every process (a no-op alone)."""
    if is_dist():
        dist.broadcast(check_collective(x), src=0)
    return x


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) of a tensor on the group's device; a no-op alone."""
    if is_dist():
        dist.all_reduce(check_collective(x), op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over processes (a new tensor; ``x`` itself is left alone)."""
    return all_reduce_(x.detach().clone()) / world_size() if is_dist() else x


def mean_over_processes(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Scalars (tensors or Python numbers) averaged over processes with one all-reduce. Each value is
    moved to ``device`` (the loss's device, where the backend can take it) before the collective."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()).to(device) if isinstance(v, torch.Tensor)
                           else torch.tensor(float(v), device=device) for v in values.values()])
    return dict(zip(values, all_reduce_mean(stacked).tolist()))


def barrier() -> None:
    """Wait for every process (a no-op alone). Under NCCL on this process's GPU: NCCL runs a
    barrier as an all-reduce on a device, and one it has to guess may be another process's."""
    if is_dist():
        dist.barrier(device_ids=[torch.cuda.current_device()] if backend() == "nccl" else None)


def destroy() -> None:
    """Leave the process group (a clean exit avoids aborts in the gloo/NCCL teardown)."""
    if is_dist():
        dist.destroy_process_group()
