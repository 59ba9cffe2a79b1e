"""Every command in README.md and docs/ parses (subcommand, options, config files and keys exist),
and no text points at a tracker readers cannot see."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import tempfile
from pathlib import Path

import pytest

from mimco.cli.main import handlers, parse_args
from mimco.config import (
    FinetuneConfig,
    PretrainConfig,
    SegmentationConfig,
    TeacherStageConfig,
    apply_overrides,
    load_config,
)
from mimco.plugins import load_file

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_OF = {"teacher": TeacherStageConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
             "eval": PretrainConfig,
             "knn": PretrainConfig, "linprobe": PretrainConfig, "extract": PretrainConfig,
             "plot": PretrainConfig, "segprobe": SegmentationConfig,
             "segfinetune": SegmentationConfig}
#: the commands that read a backbone from a checkpoint: its geometry is its own (the model keys' rules do not apply)
PROBES = {"eval", "knn", "linprobe", "plot", "segprobe", "segfinetune", "extract"}


def commands(text: str) -> list[str]:
    """Shell commands inside fenced code blocks, continuation lines joined, comments dropped."""
    out, block = [], False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.startswith("```"):
            block = not block
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if block and line:
            out.append(line)
    return out


def documented() -> list[tuple[str, str]]:
    return [(f"{p.name}: {c}", c) for p in DOCS for c in commands(p.read_text())]


def documented_spec() -> str:
    """The example study spec of docs/evaluation.md#studies (its first YAML block)."""
    text = (ROOT / "docs" / "evaluation.md").read_text().split("## Studies", 1)[1]
    return text.split("```yaml\n", 1)[1].split("```", 1)[0]


def check_study(args: argparse.Namespace) -> None:
    """A documented ``mimco study``: its spec (a bundled one, else the documented example) loads and
    takes the command's overrides."""
    from mimco.studies import load_spec, with_overrides

    spec = args.spec
    if not (ROOT / spec).is_file() and spec.endswith(".yaml"):
        spec = Path(tempfile.mkdtemp()) / spec
        spec.write_text(documented_spec())
    with_overrides(load_spec(spec), args.overrides)


def check_mimco(argv: list[str]) -> None:
    argv = [a for a in argv if a != "..."]  # "..." stands for arguments shown elsewhere
    args = parse_args(argv)
    assert args.command in handlers()
    for plugin in args.plugin:  # a documented plugin file exists and registers what the command then uses
        load_file(ROOT / plugin)
    if args.command == "study":
        check_study(args)
    cls = CONFIG_OF.get(args.command)
    overrides = getattr(args, "overrides", [])
    if cls is not None:
        model_keys = args.command not in PROBES
        if getattr(args, "config", None):
            load_config(cls, args.config, overrides, model_keys)  # the file exists and takes the overrides
        else:
            apply_overrides(cls(), overrides, model_keys)


def check_python(argv: list[str]) -> None:
    if argv[:2] == ["-m", "pytest"]:
        return
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    spec = importlib.util.spec_from_file_location(script.stem, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(argv[1:])
    if script.stem == "reproduce":  # stage-prefixed overrides: every stage's config takes its own
        p = mod.with_overrides(mod.PRESETS[args.preset], args.overrides)
        load_config(TeacherStageConfig, None, [*p["data"], *p["model"], *p["teacher"]])
        load_config(PretrainConfig, None, [*p["data"], *p["model"], *p["student"]])
        load_config(FinetuneConfig, None, [*p["data"], *p["finetune"]])
        load_config(SegmentationConfig, None, [*p["dense"], *p["dense_finetune"]], model_keys=False)


def check(command: str) -> None:
    argv = shlex.split(command.split("&&")[-1].strip())
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # leading environment variables
        argv = argv[1:]
    if argv[0] == "mimco":
        check_mimco(argv[1:])
    elif argv[0] == "torchrun":
        check_mimco(argv[argv.index("mimco") + 1:])
    elif argv[0] in ("python", "python3"):
        check_python(argv[1:])
    elif argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert all(re.search(rf"^{t}:", makefile, re.M) for t in argv[1:]), f"no make target {argv[1:]}"
    elif argv[0] in ("bash", "sbatch"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (ROOT / script).is_file(), f"{script} does not exist"
        if argv[0] == "sbatch":  # the script's arguments are mimco's
            rest = argv[argv.index(script) + 1:]
            check_mimco(["pretrain", *rest])


@pytest.mark.parametrize("where,command", documented(), ids=[w for w, _ in documented()])
def test_documented_command_parses(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)
    check(command)


def test_the_check_fails_on_a_wrong_command(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        check("mimco pretrainn --config configs/fmnist_pretrain.yaml")
    with pytest.raises(Exception, match="unknown config key|no field"):
        check("mimco pretrain --config configs/fmnist_pretrain.yaml optim.epoch=3")
    with pytest.raises(Exception, match="not found"):
        check("mimco teacher --config configs/nope.yaml")
    with pytest.raises(SystemExit):
        check("python benchmarks/throughput.py --archh vit_tiny")


def test_the_documented_study_spec_loads_and_the_check_would_catch_a_bad_one(tmp_path):
    from mimco.errors import MimcoError
    from mimco.studies import load_spec

    load_file(ROOT / "examples" / "logreg_probe.py")
    good = tmp_path / "spec.yaml"
    good.write_text(documented_spec())
    spec = load_spec(good)
    assert spec.seeds == [0, 1, 2] and [r.name for r in spec.rows][-1] == "MimCo, mask 0.75"
    good.write_text(documented_spec().replace("teacher: teacher}", "teacher: teachr}", 1))
    with pytest.raises(MimcoError, match="teacher 'teachr'"):
        load_spec(good)


def test_docs_have_commands():
    assert len(documented()) > 30


TRACKER = re.compile(r"\b(issue|ticket|tracker|PR)\s*#?\d+|\bthe [a-z-]+ issue\b|\bissue part\b|\bfrom the issue\b",
                     re.IGNORECASE)


def test_no_text_points_at_a_tracker():
    files = [*DOCS, *(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "src" / "mimco" / "configs").glob("*.yaml"), ROOT / "Makefile"]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files if f != Path(__file__)
            for i, line in enumerate(f.read_text().splitlines(), 1) if TRACKER.search(line)]
    assert hits == []


def test_the_license_file_is_the_one_pyproject_declares():
    """pyproject.toml's licence and the LICENSE file beside it agree (a wheel ships the file)."""
    declared = re.search(r'^license = \{ text = "([^"]+)" \}', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "TERMS AND CONDITIONS FOR USE" in text
