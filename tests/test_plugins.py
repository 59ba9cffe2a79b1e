"""A method owns its config and loads as a plugin: a file given with ``--plugin`` or an installed
package's ``mimco.plugins`` entry point registers a method whose section is typed, range-checked,
fixed on resume and written to ``config.yaml`` like mimco's own keys, with no edit anywhere else;
another method's section in a shared config file is checked, then left out."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mimco.cli.main import main
from mimco.config import PretrainConfig, load_config, to_dict
from mimco.errors import MimcoError
from tests.helpers import ENV, HANG, ROOT, TINY_DATA, TINY_MODEL, TINY_RUN

#: a whole stage-1 method in one file (predict the other view's class token), with a config section of its own
PLUGIN = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimco.config import setting
from mimco.methods import MethodDefaults, register_method
from mimco.models import create_vit


@dataclass
class TwinConfig:
    width: int = setting(8, min=1, what="the predictor's width", fixed=True)
    {extra}


class Twin(MethodDefaults, nn.Module):
    def __init__(self, vit, width):
        super().__init__()
        self.encoder, self.predictor = vit, nn.Linear(vit.num_features, width)
        self.target = nn.Linear(vit.num_features, width)

    def forward(self, views, step, first_index=None):
        a, b = self.encoder.forward_features(views[0])[:, 0], self.encoder.forward_features(views[1])[:, 0]
        loss = -F.cosine_similarity(self.predictor(a), self.target(b).detach(), dim=-1).mean()
        return loss, {{}}

    def backbone(self):
        return self.encoder

    def no_weight_decay(self):
        return set()


@register_method("twin", stage="teacher", views="two", sections={{"twin": TwinConfig}})
def build(cfg, device, **_):
    return Twin(create_vit(cfg.model, cfg.data.img_size, cfg.data.channels), cfg.twin.width).to(device)
'''


def plugin(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "twin.py"
    path.write_text(PLUGIN.format(extra=extra))
    return path


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY_DATA, *TINY_MODEL, *TINY_RUN, "train.max_steps=2", f"train.out_dir={tmp_path}", "train.name=twin",
            *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_plugin_key_is_one_line_in_its_own_file_checked_saved_and_fixed_on_resume(tmp_path, capsys):
    file = plugin(tmp_path, extra='depth: int = setting(1, min=1, what="the predictor\'s depth")')
    assert main(["teacher", "--plugin", str(file), "method=twin", *_args(tmp_path, "twin.depth=0")]) == 2
    assert _one_line(capsys) == ("mimco: error: twin.depth=0 is out of range: it is the predictor's depth and must be "
                                 ">= 1; fix the value in the config or the override")
    assert main(["teacher", f"--plugin={file}", "method=twin", *_args(tmp_path, "twin.dept=2")]) == 2
    assert "unknown config key 'twin.dept'; did you mean twin.depth" in _one_line(capsys)
    assert main(["teacher", "method=twin", "--plugin", str(file), *_args(tmp_path, "twin.depth=3",
                                                                          "twin.width=6")]) == 0
    saved = yaml.safe_load((tmp_path / "twin" / "config.yaml").read_text())
    assert saved["method"] == "twin" and saved["twin"] == {"width": 6, "depth": 3} and "moco" not in saved
    capsys.readouterr()
    assert main(["teacher", "--plugin", str(file), "--resume", str(tmp_path / "twin" / "last.pt"),
                 "twin.width=7"]) == 2
    assert "twin.width cannot change on resume (the checkpoint has 6, now 7)" in _one_line(capsys)


def test_without_the_plugin_its_method_is_unknown_and_its_saved_config_still_reads(tmp_path, monkeypatch):
    file = plugin(tmp_path)
    assert main(["teacher", "--plugin", str(file), "method=twin", *_args(tmp_path)]) == 0
    from mimco.config import TeacherStageConfig, from_dict
    from mimco.runs import load_checkpoint

    saved = load_checkpoint(tmp_path / "twin" / "last.pt")["config"]
    # a saved config whose method is not loaded keeps the stage's own sections (evaluation needs no more)
    import mimco.config

    monkeypatch.delitem(mimco.config._METHOD_SECTIONS, ("teacher", "twin"))  # as in a process without the plugin
    cfg = from_dict(TeacherStageConfig, saved)
    assert cfg.method == "twin" and not hasattr(cfg, "twin") and cfg.model.embed_dim == 32
    with pytest.raises(MimcoError, match="unknown method 'twin'; choose .*mocov3"):
        load_config(TeacherStageConfig, None, ["method=twin"])


def test_a_methods_config_pickles_and_copies_as_itself():
    """Its class is made at run time; a pickle (spawned workers, other libraries) rebuilds it by name."""
    import copy
    import pickle

    cfg = load_config(PretrainConfig, None, ["loss.patch_weight=0.3"])
    for again in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert type(again) is type(cfg) and again == cfg and again.loss.patch_weight == 0.3


def test_another_methods_section_is_checked_then_left_out():
    cfg = load_config(PretrainConfig, "fmnist_pretrain", ["method=simmim", "loss.patch_weight=0.5"])
    assert cfg.method == "simmim" and not hasattr(cfg, "loss") and not hasattr(cfg, "teacher")
    assert set(to_dict(cfg)) == {"method", "data", "model", "aug", "mask", "optim", "train", "eval"}
    with pytest.raises(MimcoError, match="unknown config key 'loss.patch_wieght'; did you mean loss.patch_weight"):
        load_config(PretrainConfig, None, ["method=simmim", "loss.patch_wieght=0.5"])
    with pytest.raises(MimcoError, match="unknown loss.patch_loss 'l3'; choose"):
        load_config(PretrainConfig, None, ["method=simmim", "loss.patch_loss=l3"])
    mimco = load_config(PretrainConfig, None, ["loss.patch_weight=0.5"])
    assert mimco.loss.patch_weight == 0.5 and mimco.teacher.checkpoint == ""
    switched = load_config(PretrainConfig, None, ["loss.patch_weight=0.5", "method=simmim", "mask.ratio=0.4"])
    assert not hasattr(switched, "loss") and switched.mask.ratio == 0.4


@pytest.mark.parametrize("text,want", [
    ("def broken(:\n", "the plugin {file} failed to load: SyntaxError"),
    ("raise RuntimeError('no GPU here')\n",
     "the plugin {file} failed to load: RuntimeError: no GPU here (at {file}:1)"),
])
def test_a_broken_plugin_file_is_one_line(tmp_path, capsys, text, want):
    file = tmp_path / "bad.py"
    file.write_text(text)
    assert main(["teacher", "--plugin", str(file), *_args(tmp_path)]) == 2
    assert _one_line(capsys).startswith("mimco: error: " + want.format(file=file))
    assert main(["teacher", "--plugin", str(tmp_path / "absent.py"), *_args(tmp_path)]) == 2
    assert _one_line(capsys).startswith(f"mimco: error: plugin file not found: {tmp_path / 'absent.py'}")


@pytest.mark.slow
def test_an_installed_package_entry_point_registers_its_method(tmp_path):
    """The real entry-point machinery (importlib.metadata reading a dist-info folder on the path, as
    pip leaves it): ``mimco teacher method=twin`` trains with no --plugin."""
    site = tmp_path / "site"
    (site / "twin_pkg").mkdir(parents=True)
    (site / "twin_pkg" / "__init__.py").write_text(PLUGIN.format(extra=""))
    info = site / "twin_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twin-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [mimco.plugins]
        twin = twin_pkg
    """))
    env = {**ENV, "PYTHONPATH": f"{site}:{ENV['PYTHONPATH']}"}
    r = subprocess.run([sys.executable, "-m", "mimco", "teacher", "method=twin", *_args(tmp_path, "twin.width=5")],
                       capture_output=True, text=True, env=env, timeout=HANG, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "twin" / "config.yaml").read_text())["twin"] == {"width": 5}


def test_the_package_names_no_plugin_example():
    """examples/dino.py and examples/logreg_probe.py are plugins: nothing in the package names them."""
    src = ROOT / "src" / "mimco"
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if any(word in line.lower() for word in ("dino.py", "logreg", "multicrop"))]
    assert hits == []
