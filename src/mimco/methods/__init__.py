"""Pre-training methods (one per file) and their losses."""

from mimco.methods.losses import GlobalInfoNCE, PatchContrastiveLoss, info_nce, regression_loss
from mimco.methods.mimco import MimCo
from mimco.methods.moco import MoCoV3, momentum_at

__all__ = ["GlobalInfoNCE", "MimCo", "MoCoV3", "PatchContrastiveLoss", "info_nce", "momentum_at", "regression_loss"]
