"""Evaluation protocols by name: the one contract every way of scoring a frozen backbone keeps.

A protocol registers a function ``run(probe, options) -> metrics`` under a name, with a dataclass of
its own options (:func:`register_protocol`); :class:`Probe` hands it the backbone, the data and the
features of both splits, extracted once and shared by every protocol of one call. The end of a
training run (``eval.protocols``, at ``eval.at_end``) and ``mimco probe NAME CKPT`` run them;
``knn`` (weighted k-NN: ``eval.knn_k``, ``eval.knn_temperature``), ``linear`` (the fast linear probe
with its learning-rate grid) and ``few`` (k-NN and linear probe from ``eval.few_per_class`` labels
per class over ``eval.few_label_seeds`` subsets) are mimco's own. A protocol defined outside the
package registers the same way and loads as a plugin (``--plugin FILE``, or an installed package's
``mimco.plugins`` entry point)::

    @dataclass
    class CentroidConfig:
        normalise: bool = True  # cosine (True) or Euclidean distance to the class means

    @register_protocol("centroid", options=CentroidConfig)
    def centroid(probe, opts):
        got = probe.features()            # None on every process but the main one
        if got is None:
            return {}
        (ftr, ytr), (fte, yte) = got
        ...
        return {"centroid_top1": top1}

Under torchrun every process extracts its share of each split; the main process scores and
returns the metrics, the others return ``{}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mimco.config import DataConfig, EvalConfig, choices_text, load_section
from mimco.errors import MimcoError
from mimco.eval.features import extract_features_distributed
from mimco.eval.knn import knn_accuracy


@dataclass
class Probe:
    """What a protocol scores: ``backbone`` (None: raw pixels) under ``data`` on ``device``, the
    ``splits`` (train, test), the run's ``eval`` keys and ``seed``; features on demand, cached."""

    backbone: torch.nn.Module | None
    data: DataConfig
    splits: tuple[Any, Any]
    eval: EvalConfig
    device: torch.device
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 256  # images per forward pass and process
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def split_features(self, split: str, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features (N, D) on the CPU, labels) of ``split`` ("train": the k-NN bank, at most
        ``eval.max_train`` images; "test") on the main process, None on the others."""
        key = (split, pool)
        if key not in self._cache:
            from mimco.eval.probe import bank_split

            ds = bank_split(self.splits[0], self.eval) if split == "train" else self.splits[1]
            self._cache[key] = extract_features_distributed(self.backbone, ds, self.data, self.device,
                                                            self.precision, self.batch_size, pool)
        return self._cache[key]

    def features(self, pool: str = "cls") -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                   tuple[torch.Tensor, torch.Tensor]] | None:
        """((train features, labels), (test features, labels)) on the main process, None elsewhere."""
        train, test = self.split_features("train", pool), self.split_features("test", pool)
        return None if train is None or test is None else (train, test)


Runner = Callable[[Probe, Any], dict[str, float]]


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    run: Runner
    options: type | None  # the protocol's options (a dataclass), or None


_PROTOCOLS: dict[str, ProtocolSpec] = {}


def register_protocol(name: str, options: type | None = None) -> Callable[[Runner], Runner]:
    """Decorator: register ``run(probe, opts) -> metrics`` as the protocol ``name`` with the options
    dataclass ``options`` (``opts`` is an instance of it, or None); re-registering a name replaces it."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise ValueError(f"protocol {name!r}: options must be a dataclass, not {options!r}")

    def add(run: Runner) -> Runner:
        _PROTOCOLS[name] = ProtocolSpec(name, run, options)
        return run

    return add


def protocol_names() -> list[str]:
    from mimco.plugins import load_plugins

    load_plugins()
    return sorted(_PROTOCOLS)


def get_protocol(name: str) -> ProtocolSpec:
    """The protocol ``name``; a one-line :class:`MimcoError` naming the choices otherwise."""
    if name not in _PROTOCOLS:
        names = protocol_names()
        if name not in _PROTOCOLS:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = (f" (did you mean {close[0]}?)" if close
                    else " (a protocol defined in a file of your own loads with --plugin FILE)")
            raise MimcoError(f"unknown evaluation protocol '{name}'; choose {choices_text(names)}{hint}")
    return _PROTOCOLS[name]


def protocol_options(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The options of protocol ``name``: its defaults, then ``overrides`` ({key: value}, checked
    like config keys: ``centroid.normalise``), or None for a protocol without options."""
    spec = get_protocol(name)
    if spec.options is None:
        if overrides:
            raise MimcoError(f"protocol {name} takes no options; drop {', '.join(f'{name}.{k}' for k in overrides)}")
        return None
    return load_section(spec.options, overrides or {}, name)


def run_protocols(names: list[str], probe: Probe, options: dict[str, Any] | None = None) -> dict[str, float]:
    """Every protocol of ``names`` on ``probe`` (features extracted once), its metrics merged, with
    ``<name>_seconds``; ``options``: {name: options} (else each protocol's defaults)."""
    out: dict[str, float] = {}
    for name in names:
        spec, start = get_protocol(name), time.perf_counter()
        opts = (options or {}).get(name, protocol_options(name))
        got = spec.run(probe, opts)
        if got:
            out.update(got)
            out.setdefault(f"{name}_seconds", round(time.perf_counter() - start, 1))
    return out


@register_protocol("knn")
def knn_protocol(probe: Probe, opts: None) -> dict[str, float]:
    """Weighted k-NN top-1 (``eval.knn_k``, ``eval.knn_temperature``), a bank of at most
    ``eval.max_train`` training images; scored on the run's device."""
    got = probe.features()
    if got is None:
        return {}
    (ftr, ytr), (fte, yte) = got
    ev = probe.eval
    return {"knn_top1": round(knn_accuracy(ftr.to(probe.device), ytr, fte, yte, ev.knn_k, ev.knn_temperature), 2)}


@register_protocol("linear")
def linear_protocol(probe: Probe, opts: None) -> dict[str, float]:
    """The fast linear probe (BatchNorm without affine + linear, on features extracted once; its
    learning rate chosen from a grid on a held-out tenth of the training split)."""
    from mimco.eval.linear import linear_probe

    got = probe.features()
    if got is None:
        return {}
    (ftr, ytr), (fte, yte) = got
    acc = linear_probe(*[t.to(probe.device) for t in (ftr, ytr, fte, yte)], seed=probe.seed)
    return {"linear_top1": round(acc, 2)}


@register_protocol("few")
def few_protocol(probe: Probe, opts: None) -> dict[str, float]:
    """k-NN (``eval.few_knn_k``) and the linear probe from ``eval.few_per_class`` labelled images
    per class, mean and std over ``eval.few_label_seeds`` balanced subsets."""
    from mimco.eval.probe import probe_few_labels, spread_metrics

    test = probe.split_features("test")
    ev = probe.eval
    values = probe_few_labels(probe.backbone, probe.splits[0], *(test or (None, None)), probe.data, probe.device,
                              ev.few_per_class, seeds=tuple(range(ev.few_label_seeds)), ks=(ev.few_knn_k,),
                              temperature=ev.knn_temperature, linear={"seed": probe.seed})
    return spread_metrics(values, "few_")
