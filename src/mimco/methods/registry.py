"""Training methods by name: the one place a stage finds the method it trains.

A method registers a builder, ``build(cfg, device, **inputs) -> nn.Module``, under a name, with
the stage whose config it reads (``teacher``, ``pretrain``, ``finetune`` or ``segfinetune``: the keys it may use)
and the batches it takes (``views``). The stage runner (:func:`mimco.pipeline.run_stage`) looks
the method up by the config's ``method`` key, builds the batch stream its ``views`` name, builds
the method and hands it to the engine; the engine learns the rest from the method's contract
(:class:`~mimco.methods.base.TrainingMethod`). MoCo v3, MimCo and SimMIM register when
:mod:`mimco.methods` is imported, fine-tuning and segmentation fine-tuning when :mod:`mimco.eval.finetune` and
:mod:`mimco.eval.segfinetune` are.

A method defined outside the package registers the same way before the run starts::

    from mimco.methods import register_method

    @register_method("simsiam", stage="teacher", views="two")
    def build_simsiam(cfg, device, **inputs):
        return SimSiam(create_vit(cfg.model, cfg.data.img_size, cfg.data.channels)).to(device)

and then trains with ``method=simsiam`` (``mimco.cli.main.main([...])`` or
:func:`mimco.pipeline.run_stage`), under torchrun too (docs/architecture.md#adding-a-method).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from mimco.config import choices_text
from mimco.errors import MimcoError

Stage = Literal["teacher", "pretrain", "finetune", "segfinetune"]
#: the batches a method takes: two augmented views (contrastive), one view (masked image modeling),
#: one augmented view and its labels (supervised), or one augmented view and its mask (segmentation)
Views = Literal["two", "one", "labelled", "masks"]
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: Stage
    views: Views
    #: (cfg, device, stream=the BatchStream, run_dir=the run folder, **what the caller passes, e.g. fine-tuning's
    #: backbone) -> the method, on ``device``; a builder takes ``**inputs`` for what it does not use
    build: Builder


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, stage: Stage, views: Views) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as the method ``name`` of ``stage`` (re-registering a name
    replaces it, so a module may be imported twice)."""
    if stage not in typing.get_args(Stage) or views not in typing.get_args(Views):
        raise ValueError(f"method {name!r}: stage must be one of {typing.get_args(Stage)} and views one of "
                         f"{typing.get_args(Views)}, not {stage!r} / {views!r}")

    def add(build: Builder) -> Builder:
        _METHODS[name] = MethodSpec(name, stage, views, build)
        return build

    return add


def method_names(stage: str | None = None) -> list[str]:
    """The registered methods (of ``stage``), by name."""
    return sorted(n for n, s in _METHODS.items() if stage is None or s.stage == stage)


def get_method(name: str, stage: str) -> MethodSpec:
    """The method ``name`` of ``stage``; a :class:`MimcoError` naming the choices otherwise."""
    spec = _METHODS.get(name)
    if spec is not None and spec.stage == stage:
        return spec
    names = method_names(stage)
    if spec is not None:
        raise MimcoError(f"method '{name}' trains with `mimco {spec.stage}`, not `mimco {stage}`; choose "
                         f"{choices_text(names)}")
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise MimcoError(f"unknown method '{name}'; choose {choices_text(names)}{hint}")
