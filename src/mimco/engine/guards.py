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

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def agreed(self, device: torch.device) -> bool:
        """True on every process when any process was asked to stop (one small all-reduce)."""
        if not dist.is_dist():
            return self.requested is not None
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(dist.all_reduce_(flag, "max").item())


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
