"""The whole config is checked when it is built: every bad choice, range or combination of every
stage fails with its one-line message before any data set or model is built (a data set stub that
fails the test if it is reached stands in for a minute of data generation or an ImageNet decode)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from mimco.cli.main import main
from mimco.config import FinetuneConfig, PretrainConfig, TeacherStageConfig, load_config, stage_class
from mimco.config_rules import bounds
from mimco.errors import MimcoError
from tests.helpers import TINY_DATA, TINY_MODEL

#: each stage's config class with its default method's sections (MoCo v3's moco, MimCo's teacher and loss)
CLASSES = {"teacher": stage_class(TeacherStageConfig, "mocov3"), "pretrain": stage_class(PretrainConfig, "mimco"),
           "finetune": FinetuneConfig}


class DataReached(AssertionError):
    pass


@pytest.fixture
def no_data(monkeypatch):
    """Building a stage's batches fails the test: the config must have been refused before."""
    import mimco.pipeline

    def stub(*args, **kwargs):
        raise DataReached("the batches were built before the config was checked")

    monkeypatch.setattr(mimco.pipeline, "build_stream", stub)


def literal_keys(cls: type, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, choices) of every key of ``cls`` whose type is a Literal."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += literal_keys(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is typing.Literal:
            out.append((prefix + f.name, typing.get_args(hint)))
    return out


def _refused(stage: str, overrides: list[str], capsys) -> str:
    """Run ``mimco <stage>`` (pre-training stages) or build the config (fine-tuning, whose command
    first reads a checkpoint) and return the one-line error."""
    if stage == "finetune":
        with pytest.raises(MimcoError) as e:
            load_config(FinetuneConfig, None, overrides)
        return f"mimco: error: {e.value}"
    assert main([stage, *TINY_DATA, *TINY_MODEL, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


CHOICES = [(stage, key, choices) for stage, cls in CLASSES.items() for key, choices in literal_keys(cls)]


@pytest.mark.parametrize("stage,key,choices", CHOICES, ids=[f"{s}:{k}" for s, k, _ in CHOICES])
def test_every_choice_is_checked_at_load(stage, key, choices, no_data, capsys):
    line = _refused(stage, [f"{key}=bogus"], capsys)
    assert line == f"mimco: error: unknown {key} 'bogus'; choose {', '.join(choices[:-1])} or {choices[-1]}"


def _hint(cls: type, key: str) -> type:
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def _below(cls: type, key: str, low: float, inclusive: bool) -> str:
    """The value just out of range, written as the config's type prints it (``0.0`` for a float)."""
    value = low - 1 if inclusive else low
    return str(float(value)) if _hint(cls, key) is float else str(int(value))


RANGES = [(stage, key, _below(cls, key, low, inclusive)) for stage, cls in CLASSES.items()
          for key, low, inclusive, _ in bounds(cls)]


@pytest.mark.parametrize("stage,key,value", RANGES, ids=[f"{s}:{k}" for s, k, _ in RANGES])
def test_every_range_is_checked_at_load(stage, key, value, no_data, capsys):
    assert _refused(stage, [f"{key}={value}"], capsys).startswith(f"mimco: error: {key}={value} is out of range")


COMBINATIONS = [
    ("pretrain", ["mask.ratio=1.0"], "mask.ratio=1.0 is out of range"),
    ("pretrain", ["model.embed_dim=30", "model.num_heads=4"],
     "model.embed_dim=30 is not divisible by model.num_heads=4"),
    ("teacher", ["data.img_size=18"], "data.img_size=18 is not divisible by model.patch_size=4"),
    ("pretrain", ["mask.mask_patch_size=6"], "mask.mask_patch_size=6 is not a multiple of model.patch_size=4"),
    ("pretrain", ["mask.mask_patch_size=12"], "the 4x4 patch grid does not split into mask units of 3x3 patches"),
    ("teacher", ["model.pos_embed=sincos", "model.embed_dim=34", "model.num_heads=2"],
     "needs model.embed_dim divisible by 4"),
    ("teacher", ["data.decode=gpu"],
     "data.decode=gpu decodes image files on the device; it does not apply to procedural"),
    ("teacher", ["data.cache=true"], "data.cache=true decodes an image folder once; procedural is already in memory"),
    ("teacher", ["data.name=folder", "data.root=/x", "data.on_device=true"], "data.on_device=true needs an in-memory"),
    ("finetune", ["data.decode=gpu", "data.name=imagefolder"],
     "data.decode=gpu decodes for pre-training's batched views"),
    ("finetune", ["data.name=folder"], "fine-tuning needs labels"),
    ("teacher", ["data.shuffle_buffer=64"], "data.shuffle_buffer applies to data.name=shards, not procedural"),
    ("teacher", ["data.name=shards", "data.shuffle_buffer=-1"], "data.shuffle_buffer=-1 must be 0"),
    ("pretrain", ["data.name=folder", "data.val_root=/v"],
     "data.val_root applies to data.name=shards or hf, not folder"),
    ("finetune", ["data.name=shards", "data.image_column=img"],
     "data.image_column applies to data.name=hf, not shards"),
    ("teacher", ["data.label_column=y"], "data.label_column applies to data.name=hf, not procedural"),
    ("pretrain", ["teacher.mean=[0.5]"], "set teacher.mean and teacher.std together"),
    ("pretrain", ["data.labels_per_class=4"], "labels for classification fine-tuning (mimco finetune); this stage"),
    ("finetune", ["data.labels_per_class=4", "data.labels_fraction=0.1"], "both set; choose one"),
    ("pretrain", ["loss.patch_weight=0", "loss.image_weight=0"], "nothing to learn"),
    ("teacher", ["train.compile=true", "train.strategy=fsdp", "train.compile_mode=reduce-overhead"],
     "records CUDA graphs"),
    ("teacher", ["train.device=tpu"], "unknown train.device 'tpu'; choose auto, cpu, cuda or cuda:N"),
    ("teacher", ["method=mimco"], "method 'mimco' trains with `mimco pretrain`, not `mimco teacher`"),
    ("pretrain", ["method=simmin"], "unknown method 'simmin'; choose mimco or simmim (did you mean simmim?)"),
]


@pytest.mark.parametrize("stage,overrides,message", COMBINATIONS, ids=[" ".join(o) for _, o, _ in COMBINATIONS])
def test_every_combination_rule_is_checked_before_any_data(stage, overrides, message, no_data, capsys):
    assert message in _refused(stage, overrides, capsys)


def test_a_good_config_reaches_the_data(no_data, tmp_path):
    """The stub is where a valid config's stage goes next: the checks above ran before it."""
    with pytest.raises(DataReached):
        main(["teacher", *TINY_DATA, *TINY_MODEL, f"train.out_dir={tmp_path}"])


def test_the_choices_are_the_implementations_tables():
    """The Literals of the config are the tables their implementations act on."""
    from mimco.config import Arch, DatasetName
    from mimco.config_rules import IN_MEMORY, PRESETS
    from mimco.data.build import DATASETS

    assert typing.get_args(Arch) == tuple(PRESETS)
    assert typing.get_args(DatasetName) == DATASETS and set(IN_MEMORY) < set(DATASETS)


def test_target_centring_cannot_change_on_resume_even_from_an_older_checkpoint():
    """The running mean is in the checkpoint or not: a run saved before the key existed counts as
    'none', so resuming it with centring on is a one-line refusal, not a missing-key error."""
    from mimco.config import to_dict
    from mimco.config_rules import check_resume

    old = to_dict(load_config(PretrainConfig, None, []))
    del old["loss"]["target_centring"]
    with pytest.raises(MimcoError, match="loss.target_centring cannot change on resume"):
        check_resume(old, load_config(PretrainConfig, None, ["loss.target_centring=position"]))
    check_resume(old, load_config(PretrainConfig, None, []))  # the same: fine
    saved = to_dict(load_config(PretrainConfig, None, ["loss.target_centring=position"]))
    with pytest.raises(MimcoError, match="checkpoint has 'position', now 'none'"):
        check_resume(saved, load_config(PretrainConfig, None, []))
