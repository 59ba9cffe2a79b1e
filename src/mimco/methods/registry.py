"""Training methods by name: the one place a stage finds the method it trains.

The builder's contract: docs/architecture.md#contracts ("Method registry"). MoCo v3, MimCo and SimMIM
register when :mod:`mimco.methods` is imported, fine-tuning and segmentation fine-tuning with
:mod:`mimco.eval.finetune` and :mod:`mimco.eval.segfinetune`; a plugin registers the same way
(docs/architecture.md#adding-a-method).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from mimco.config import register_sections, unknown_method
from mimco.data.stream import view_names

Stage = Literal["teacher", "pretrain", "finetune", "segfinetune"]
#: the batches a method takes, a view kind registered in :mod:`mimco.data.stream`: ``two`` augmented views
#: (contrastive), ``one`` view (masked image modeling), ``labelled`` (one augmented view and its label),
#: ``masks`` (one augmented view and its mask), or one a plugin registers (:func:`mimco.data.stream.register_views`)
Views = str
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


def register_method(name: str, *, stage: Stage, views: Views,
                    sections: dict[str, type] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as the method ``name`` of ``stage``, with the config sections it
    owns (``{"moco": MocoConfig}``: section name -> dataclass); re-registering a name replaces it, so a
    module may be imported twice."""
    if stage not in typing.get_args(Stage) or views not in view_names():
        raise ValueError(f"method {name!r}: stage must be one of {typing.get_args(Stage)} and views one of "
                         f"{view_names()} (register a new kind first), not {stage!r} / {views!r}")

    def add(build: Builder) -> Builder:
        _METHODS[name] = MethodSpec(name, stage, views, build)
        register_sections(stage, name, sections or {})
        return build

    return add


def method_names(stage: str | None = None) -> list[str]:
    """The registered methods (of ``stage``), by name."""
    return sorted(n for n, s in _METHODS.items() if stage is None or s.stage == stage)


def get_method(name: str, stage: str) -> MethodSpec:
    """The method ``name`` of ``stage``; a :class:`MimcoError` naming the choices otherwise."""
    if (spec := _METHODS.get(name)) is not None and spec.stage == stage:
        return spec
    raise unknown_method(name, stage)
