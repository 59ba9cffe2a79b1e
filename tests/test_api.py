"""`import mimco`: the documented surface, and docs/python.md executed as it is."""

import re

import pytest

import mimco
from tests.helpers import ROOT

DOC = ROOT / "docs" / "python.md"


def test_the_api_is_listed_typed_and_loaded_on_first_use():
    assert set(mimco.__all__) == {"MimcoError", "__version__", "load_config", "train", "load_backbone",
                                  "extract_features", "knn", "probe", "study", "export"}
    for name in mimco.__all__:
        obj = getattr(mimco, name)
        if callable(obj) and name != "MimcoError":
            assert obj.__doc__ and obj.__annotations__.get("return"), name
            assert f"mimco.{name}(" in DOC.read_text(), f"{name} is not in docs/python.md"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mimco.nothing  # noqa: B018


def test_misuse_is_a_one_line_error():
    with pytest.raises(mimco.MimcoError, match="unknown stage 'pretrian'; choose teacher, pretrain"):
        mimco.load_config("pretrian")
    with pytest.raises(mimco.MimcoError, match="is not a stage config"):
        mimco.train(object())
    cfg = mimco.load_config("finetune", overrides=["data.name=procedural"])
    with pytest.raises(mimco.MimcoError, match="trains a backbone: pass backbone=PATH"):
        mimco.train(cfg)
    pcfg = mimco.load_config("pretrain", overrides=["data.name=procedural"])
    with pytest.raises(mimco.MimcoError, match="unknown evaluation protocol 'knnn'"):
        mimco.probe(None, pcfg, "knnn")
    with pytest.raises(mimco.MimcoError, match=r"options for linear, which is not among the protocols \['knn'\]"):
        mimco.probe(None, pcfg, "knn", linear={"x": 1})


@pytest.mark.slow
def test_docs_python_md_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/python.md, block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "export" / "student" / "config.json").is_file()
    assert (tmp_path / "runs" / "student" / "epoch_0003.pt").is_file()
