"""The method contract: every training method satisfies TrainingMethod, and its backbone sits in
its state dict where the run-checkpoint layout (mimco.runs) says it does."""

import pytest
import torch
from torch import nn

from mimco.config import FinetuneConfig, ModelConfig
from mimco.masking import MaskGenerator
from mimco.methods import MoCoV3
from mimco.methods.base import MethodDefaults, TrainingMethod, backbone_prefixes, check_method
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


#: each method's encoders, the evaluated one first, and where each sits in the method's state dict
PREFIXES = [{"momentum": "momentum_encoder.", "base": "base_encoder."}, {"backbone": "student.backbone."},
            {"backbone": "student.backbone."}, {"backbone": "model."}]


@pytest.mark.parametrize("method,want", [(m, w) for (_, m), w in zip(methods(), PREFIXES)],
                         ids=["moco", "mimco", "simmim", "finetune"])
def test_each_encoder_is_recorded_by_name_at_its_place(method, want):
    """backbone_prefixes: each name of encoders() -> where that module sits among named_modules, with a dot."""
    assert backbone_prefixes(method) == want
    places = dict(method.named_modules())
    for name, prefix in want.items():  # the same module, found by its key prefix
        assert places[prefix[:-1]] is method.encoders()[name]
    assert list(method.encoders()) == list(want)  # the evaluated encoder first


class _Toy(MethodDefaults, nn.Module):
    """Two ViTs (the second frozen), a ModuleList-blocks ViT-like module, and two look-alikes that are no ViT."""

    def __init__(self, frozen=True):
        super().__init__()
        self.a, self.b = _vit(), _vit()
        self.c = nn.Module()
        self.c.patch_embed, self.c.blocks = nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.no_blocks = nn.Module()
        self.no_blocks.patch_embed, self.no_blocks.blocks = nn.Linear(2, 2), nn.Linear(2, 2)  # blocks no container
        self.no_embed = nn.Module()
        self.no_embed.blocks = nn.Sequential(nn.Linear(2, 2))
        self._frozen = frozen

    def backbone(self):
        return self.a

    def frozen_modules(self):
        return [self.b] if self._frozen else []


def test_vits_finds_each_vit_and_no_look_alike():
    from mimco.methods.base import vits

    toy = _Toy()
    assert [id(m) for m in vits(toy)] == [id(toy.a), id(toy.b), id(toy.c)]
    assert vits(nn.Linear(2, 2)) == [] and vits(toy.no_embed) == [] and vits(toy.no_blocks) == []


def test_default_hooks_compile_every_vits_parts_and_shard_the_unfrozen_ones():
    toy = _Toy()
    want = [toy.a.patch_embed, *toy.a.blocks, toy.b.patch_embed, *toy.b.blocks, toy.c.patch_embed, *toy.c.blocks]
    assert [id(m) for m in toy.compile_targets()] == [id(m) for m in want]
    assert [id(m) for m in toy.fsdp_units()] == [id(toy.a), id(toy.c)]  # b is frozen: whole on every process
    unfrozen = _Toy(frozen=False)
    assert [id(m) for m in unfrozen.fsdp_units()] == [id(unfrozen.a), id(unfrozen.b), id(unfrozen.c)]
    assert toy.encoders() == {"backbone": toy.a} and backbone_prefixes(toy) == {"backbone": "a."}
    assert (toy.total_steps, toy.metric_keys, toy.param_groups(0.1), toy.after_step(3), toy.on_epoch_end(1.0)) == \
        (1, (), None, None, {})


def test_an_encoder_outside_the_method_is_refused_by_name_and_the_method_itself_has_no_prefix():
    toy = _Toy()
    toy.encoders = lambda: {"backbone": toy.a, "stray": _vit()}
    with pytest.raises(TypeError, match=r"^_Toy\.encoders\(\)\['stray'\] is not a submodule of the method$"):
        backbone_prefixes(toy)
    toy.encoders = lambda: {"whole": toy, "backbone": toy.a}
    assert backbone_prefixes(toy) == {"whole": "", "backbone": "a."}  # the root module: no prefix
