"""Pre-training methods (one per file), their losses, and the registry the stages build them from.

Importing this package registers MoCo v3 (``mocov3``, stage 1), MimCo (``mimco``) and SimMIM
(``simmim``) (stage 2); see :mod:`mimco.methods.registry` to add one.
"""

from mimco.methods.base import MethodDefaults, TrainingMethod
from mimco.methods.losses import GlobalInfoNCE, PatchContrastiveLoss, info_nce, regression_loss
from mimco.methods.mimco import MimCo
from mimco.methods.moco import MoCoV3, momentum_at
from mimco.methods.registry import MethodSpec, get_method, method_names, register_method
from mimco.methods.simmim import SimMIM

__all__ = ["GlobalInfoNCE", "MethodDefaults", "MethodSpec", "MimCo", "MoCoV3", "PatchContrastiveLoss", "SimMIM",
           "TrainingMethod", "get_method", "info_nce", "method_names", "momentum_at", "register_method",
           "regression_loss"]
