"""The training engine shared by both stages: optimiser, schedule, checkpoints, the loop."""

from mimco.engine.checkpoint import atomic_save, load_checkpoint, save_weights
from mimco.engine.optim import build_optimizer, build_scheduler, scaled_lr
from mimco.engine.trainer import Trainer

__all__ = ["Trainer", "atomic_save", "build_optimizer", "build_scheduler", "load_checkpoint", "save_weights", "scaled_lr"]
