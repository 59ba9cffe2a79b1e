"""The training engine shared by every stage: optimiser, schedule, guards, sharding, the loop."""

from mimco.engine.optim import build_optimizer, build_scheduler, scaled_lr
from mimco.engine.trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "build_scheduler", "scaled_lr"]
