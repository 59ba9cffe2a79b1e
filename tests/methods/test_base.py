"""The method contract: every training method satisfies TrainingMethod, and its backbone sits in
its state dict where the run-checkpoint layout (mimco.runs) says it does."""

import pytest
import torch
from torch import nn

from mimco.config import FinetuneConfig, ModelConfig
from mimco.masking import MaskGenerator
from mimco.methods import MoCoV3
from mimco.methods.base import TrainingMethod, backbone_prefixes, check_method
from mimco.methods.simmim import SimMIM
from mimco.models import MaskedViT, create_vit
from mimco.runs import _LEGACY_BACKBONES, backbone_state
from tests.helpers import tiny_mimco


def _vit():
    return create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16, 3)


def methods():
    from mimco.eval.finetune import Finetune, build_classifier

    gen = MaskGenerator("random", 0.5, (4, 4), seed=0)
    return [("teacher", MoCoV3(_vit(), 16, 32)), ("pretrain", tiny_mimco()),
            ("pretrain", SimMIM(MaskedViT(_vit()), gen)),
            ("finetune", Finetune(build_classifier(_vit(), 10), FinetuneConfig(), 10, None, None))]


@pytest.mark.parametrize("stage,method", methods(), ids=["moco", "mimco", "simmim", "finetune"])
def test_methods_keep_the_contract_and_the_layout(stage, method):
    assert isinstance(method, TrainingMethod)
    check_method(method)
    want = {k: v for k, v in method.backbone().state_dict().items() if not k.startswith("head.")}
    prefixes = backbone_prefixes(method)  # what the checkpoint records
    got = backbone_state(method.state_dict(), next(iter(prefixes.values())))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the same places as checkpoints written before the record (read with the stage's table)
    assert list(prefixes.values()) == list(_LEGACY_BACKBONES[stage].values())


def test_a_module_without_the_hooks_is_refused_by_name():
    with pytest.raises(TypeError, match="lacks .*backbone.*no_weight_decay"):
        check_method(nn.Linear(2, 2))


MEMBERS = ("total_steps", "metric_keys", "forward", "backbone", "no_weight_decay", "param_groups", "after_step",
           "on_epoch_end", "encoders", "frozen_modules", "compile_targets", "fsdp_units")


@pytest.mark.parametrize("missing", [m for m in MEMBERS if m != "forward"])  # every nn.Module has a forward
def test_each_member_of_the_contract_is_required(missing):
    """A module with every member but one is refused, and the message names the class and that member."""
    members = {n: (lambda self, *a, **k: None) for n in MEMBERS if n not in ("total_steps", "metric_keys")}
    members.update(total_steps=1, metric_keys=())
    del members[missing]
    partial = type("Partial", (nn.Module,), members)()
    with pytest.raises(TypeError, match=rf"^Partial is not a TrainingMethod: it lacks {missing}$"):
        check_method(partial)
    complete = type("Complete", (nn.Module,),
                    {**members, missing: 1 if missing == "total_steps" else (lambda self: None)})()
    check_method(complete)


def test_two_missing_members_are_listed_with_commas():
    with pytest.raises(TypeError, match=r"^Linear is not a TrainingMethod: it lacks total_steps, metric_keys, "):
        check_method(nn.Linear(2, 2))
