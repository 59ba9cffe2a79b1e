"""The method registry: register_method checks the stage and the views, stores the spec under its
name and registers the method's config sections; get_method / method_names look methods up by stage."""

import re
from dataclasses import dataclass, fields

import pytest

import mimco.config as config
import mimco.methods.registry as registry
from mimco.config import PretrainConfig, TeacherStageConfig, stage_class
from mimco.data.stream import view_names
from mimco.errors import MimcoError
from mimco.methods.registry import MethodSpec, get_method, method_names, register_method

STAGES = ("teacher", "pretrain", "finetune", "segfinetune")  # the stages written out, not read from the module


@dataclass
class ToyConfig:
    width: int = 3


def _build(cfg, device, **_):
    return None


@pytest.fixture
def fresh(monkeypatch):
    """Registries as they are now, restored after the test (so test methods never leak into others)."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(config, "_METHOD_SECTIONS", dict(config._METHOD_SECTIONS))
    monkeypatch.setattr(config, "_STAGE_CLASSES", dict(config._STAGE_CLASSES))


@pytest.mark.parametrize("stage, views", [("stage3", "one"), ("teacher", "three"), ("stage3", "three")])
def test_a_bad_stage_or_views_is_refused_with_the_choices(fresh, stage, views):
    want = (f"method 'toy': stage must be one of {STAGES} and views one of {view_names()} (register a new kind "
            f"first), not {stage!r} / {views!r}")
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        register_method("toy", stage=stage, views=views)
    assert "toy" not in registry._METHODS and ("teacher", "toy") not in config._METHOD_SECTIONS


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_and_view_kind_is_accepted(fresh, stage):
    for views in view_names():
        assert register_method(f"toy_{views}", stage=stage, views=views)(_build) is _build
        assert get_method(f"toy_{views}", stage) == MethodSpec(f"toy_{views}", stage, views, _build)


def test_the_spec_is_stored_under_its_name_with_its_sections(fresh):
    returned = register_method("toy", stage="teacher", views="two", sections={"toy": ToyConfig})(_build)
    assert returned is _build  # the decorator hands the builder back unchanged
    spec = get_method("toy", "teacher")
    assert (spec.name, spec.stage, spec.views, spec.build) == ("toy", "teacher", "two", _build)
    assert config._METHOD_SECTIONS[("teacher", "toy")] == {"toy": ToyConfig}
    cls = stage_class(TeacherStageConfig, "toy")  # the run config of method=toy has the section, typed
    assert {f.name: f.type for f in fields(cls)}["toy"] is ToyConfig
    assert cls().toy == ToyConfig() and cls().method == "toy"


def test_a_method_without_sections_registers_none(fresh):
    register_method("toy", stage="pretrain", views="one")(_build)
    assert config._METHOD_SECTIONS[("pretrain", "toy")] == {}


def test_re_registering_replaces_the_spec_and_the_sections(fresh):
    register_method("toy", stage="teacher", views="two", sections={"toy": ToyConfig})(_build)
    other = lambda cfg, device, **_: None  # noqa: E731
    register_method("toy", stage="teacher", views="one")(other)
    assert get_method("toy", "teacher") == MethodSpec("toy", "teacher", "one", other)
    assert config._METHOD_SECTIONS[("teacher", "toy")] == {}


def test_method_names_by_stage_and_in_all(fresh):
    register_method("aaa", stage="pretrain", views="one")(_build)
    register_method("zzz", stage="teacher", views="two")(_build)
    by_stage = {s: [n for n, spec in registry._METHODS.items() if spec.stage == s] for s in STAGES}
    for stage in STAGES:
        assert method_names(stage) == sorted(by_stage[stage])
    assert method_names("teacher")[-1] == "zzz" and method_names("pretrain")[0] == "aaa"
    assert {"mocov3", "zzz"} <= set(method_names("teacher")) and "aaa" not in method_names("teacher")
    assert {"aaa", "mimco", "simmim"} <= set(method_names("pretrain")) and "mocov3" not in method_names("pretrain")
    assert method_names() == sorted(registry._METHODS) and {"aaa", "zzz", "mocov3", "mimco"} <= set(method_names())


def test_get_method_refuses_another_stages_method_and_an_unknown_name():
    assert get_method("mocov3", "teacher").build.__name__ == "build_mocov3"
    assert get_method("mimco", "pretrain").views == "one" and get_method("mocov3", "teacher").views == "two"
    with pytest.raises(MimcoError, match=r"^method 'mocov3' trains with `mimco teacher`, not `mimco pretrain`"):
        get_method("mocov3", "pretrain")
    with pytest.raises(MimcoError, match=r"^unknown method 'mocov4'; choose .*mocov3.*\(did you mean mocov3\?\)$"):
        get_method("mocov4", "teacher")


def test_the_built_in_methods_register_their_sections():
    from mimco.methods.mimco import MimcoLossConfig
    from mimco.methods.moco import MocoConfig

    assert config._METHOD_SECTIONS[("teacher", "mocov3")] == {"moco": MocoConfig}
    assert config._METHOD_SECTIONS[("pretrain", "mimco")] == {"teacher": config.FrozenTeacherConfig,
                                                              "loss": MimcoLossConfig}
    assert config._METHOD_SECTIONS[("pretrain", "simmim")] == {}
    assert {f.name for f in fields(stage_class(PretrainConfig, "mimco"))} >= {"teacher", "loss", "method"}
