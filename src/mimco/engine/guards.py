"""Guards of a training loop: stop cleanly on SIGTERM/SIGINT, catch a non-finite loss without
a host sync per step."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from mimco import distributed as dist


class StopSignal:
    """Within ``with StopSignal() as stop``: the first SIGTERM or SIGINT sets ``stop.requested``
    (the loop finishes its step, checkpoints and exits 0); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._vote: _Vote | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def agreed(self, device: torch.device) -> bool:
        """Called after every step: True on every process, at the same step, once any process was asked to
        stop (alone: the flag itself; distributed: the previous step's all-reduced flag, read without a
        host-device sync by :class:`_Vote`, as docs/training.md#many-gpus-interruptions-bad-data says)."""
        if not dist.is_dist():
            return self.requested is not None
        if self._vote is None or self._vote.device != device:
            self._vote = _Vote(device)
        return self._vote(self.requested is not None)


class _Vote:
    """One all-reduce (max) of a flag per call, read one call later without a host-device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = torch.zeros(1, device=device)
        cuda = device.type == "cuda"
        self.host = torch.zeros(1, pin_memory=cuda)  # host-only: the reduced flag is read here, never reduced
        self.done = torch.cuda.Event() if cuda else None

    def __call__(self, requested: bool) -> bool:
        # the copy queued one step ago, behind that step's kernels (none at the first call: an event
        # never recorded does not wait, and the host flag is still 0)
        if self.done is not None:
            self.done.synchronize()
        previous = bool(self.host[0] > 0)
        self.flag.fill_(1.0 if requested else 0.0)  # a fill kernel: no copy from the host
        dist.all_reduce_(self.flag, "max")
        self.host.copy_(self.flag, non_blocking=self.done is not None)
        if self.done is not None:
            self.done.record()
        return previous


class FiniteGuard:
    """Remembers the first step whose loss was NaN/Inf, on the device; read only when checked."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def bad_step(self) -> int | None:
        """The first bad step on any process, or None (one host sync)."""
        s = dist.all_reduce_(self.first_bad.clone(), "max")
        return int(s) if int(s) >= 0 else None
