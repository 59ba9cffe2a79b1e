"""Evaluation protocols by name: the one contract every way of scoring a frozen backbone keeps.

A protocol registers ``run(probe, options) -> metrics`` under a name, with a dataclass of its own
options (:func:`register_protocol`); :class:`Probe` hands it the backbone, the data and the features of
both splits, extracted once and shared by every protocol of one call. The built-in protocols, where
they run and how a plugin adds one (with a whole example): docs/evaluation.md#evaluate.
Under torchrun every process extracts its share of each split; the main process scores and returns
the metrics, the others return ``{}``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mimco.config import (
    DataConfig,
    EvalConfig,
    SegmentationConfig,
    apply_overrides,
    choices_text,
    load_section,
    setting,
    to_dict,
)
from mimco.data.segmentation import load_segmentation
from mimco.errors import MimcoError
from mimco.eval.features import extract_features_distributed
from mimco.eval.knn import knn_accuracy
from mimco.eval.linear import linear_probe
from mimco.eval.probe import bank_split, probe_few_labels, spread_metrics
from mimco.eval.segmentation import segprobe
from mimco.plugins import load_plugins


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
    patch: int = 0  # the patch size raw pixels are cut into (0: the backbone's)
    #: the same backbone built for another input side (a dense protocol's images); None: a copy with its
    #: position table resampled (timm's ``set_input_size``)
    at_size: Callable[[int], torch.nn.Module] | None = None
    folder: Path | None = None  # where a protocol that trains (fine-tuning) keeps its run folders
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def backbone_at(self, side: int) -> torch.nn.Module | None:
        """The backbone for ``side``-px images (None for raw pixels), on the probe's device."""
        if self.backbone is None:
            return None
        if self.at_size is not None:
            return self.at_size(side).to(self.device)
        model = copy.deepcopy(self.backbone)
        model.set_input_size(img_size=side)
        return model

    def split_features(self, split: str, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features (N, D) on the CPU, labels) of ``split`` ("train": the k-NN bank, at most
        ``eval.max_train`` images; "test") on the main process, None on the others."""
        key = (split, pool)
        if key not in self._cache:
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
#: a protocol's table cells: (its metrics, one dict per model seed; its options; the eval keys) -> {header: cell}
Columns = Callable[[list[dict[str, float]], Any, EvalConfig], dict[str, str]]
#: what its columns are, for a table's header: (its options, the eval keys) -> text
Note = Callable[[Any, EvalConfig], str]


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    run: Runner
    options: type | None  # the protocol's options (a dataclass), or None
    columns: Columns | None = None  # its cells in a study's table (None: one per metric)
    note: Note | None = None  # what they are, for the table's header


_PROTOCOLS: dict[str, ProtocolSpec] = {}


def register_protocol(name: str, options: type | None = None, columns: Columns | None = None,
                      note: Note | None = None) -> Callable[[Runner], Runner]:
    """Decorator: register ``run(probe, opts) -> metrics`` as the protocol ``name`` with the options
    dataclass ``options`` (``opts`` is an instance of it, or None), the ``columns`` it shows in a
    study's table (default: one per metric, mean ± std over seeds) and the ``note`` that says what
    they are in the table's header; re-registering a name replaces it."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise ValueError(f"protocol {name!r}: options must be a dataclass, not {options!r}")

    def add(run: Runner) -> Runner:
        _PROTOCOLS[name] = ProtocolSpec(name, run, options, columns, note)
        return run

    return add


def cell(values: list[float]) -> str:
    """A table cell: "-" (no value), one value, or mean ± sample std, to one decimal."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def spread_cell(runs: list[dict[str, float]], key: str, count: str = "") -> str:
    """The cell of a metric that is itself a mean (``key``, with ``key_std``) over ``runs[i][count]``
    values (label subsets, probe heads) per model seed: mean ± sample std over every (seed, value)
    pair, pooled exactly from each seed's mean and std; without ``count``, over the seeds' means."""
    got = [m for m in runs if key in m]
    if not got or f"{key}_std" not in got[0] or not (count or len(got) == 1):
        return cell([m[key] for m in got])
    n = [int(m.get(count, 2)) for m in got]
    total = sum(n)
    mean = sum(k * m[key] for k, m in zip(n, got)) / total
    ss = sum((k - 1) * m[f"{key}_std"] ** 2 + k * (m[key] - mean) ** 2 for k, m in zip(n, got))
    return f"{mean:.1f} ± {(ss / (total - 1)) ** 0.5 if total > 1 else 0.0:.1f}"


def table_cells(name: str, runs: list[dict[str, float]], opts: Any, ev: EvalConfig) -> dict[str, str]:
    """Protocol ``name``'s cells in a study's table, from its metrics of each model seed."""
    spec = get_protocol(name)
    if spec.columns is not None:
        return spec.columns(runs, opts, ev)
    keys = dict.fromkeys(k for m in runs for k in m if not k.endswith(("_std", "_seconds")))
    return {k: spread_cell(runs, k) for k in keys}


def protocol_names() -> list[str]:
    load_plugins()
    return sorted(_PROTOCOLS)


def get_protocol(name: str) -> ProtocolSpec:
    """The protocol ``name``; a one-line :class:`MimcoError` naming the choices otherwise."""
    if name in _PROTOCOLS or name in (names := protocol_names()):
        return _PROTOCOLS[name]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = (f" (did you mean {close[0]}?)" if close
            else " (a protocol defined in a file of your own loads with --plugin FILE)")
    raise MimcoError(f"unknown evaluation protocol '{name}'; choose {choices_text(names)}{hint}")


def protocol_options(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The options of protocol ``name``: its defaults, then ``overrides`` ({key: value}, checked
    like config keys: ``segprobe.heads``), or None for a protocol without options."""
    spec = get_protocol(name)
    if spec.options is None:
        if overrides:
            raise MimcoError(f"protocol {name} takes no options; drop {', '.join(f'{name}.{k}' for k in overrides)}")
        return None
    return load_section(spec.options, overrides or {}, name)


def run_protocols(names: list[str], probe: Probe, options: dict[str, Any] | None = None,
                  digits: int | None = 2) -> dict[str, float]:
    """Every protocol of ``names`` on ``probe`` (features extracted once), its metrics merged (floats
    rounded to ``digits``; None: as computed), with ``<name>_seconds``; ``options``: {name: options}
    (else each protocol's defaults)."""
    out: dict[str, float] = {}
    for name in names:
        spec, start = get_protocol(name), time.perf_counter()
        got = spec.run(probe, (options or {}).get(name, protocol_options(name)))
        if got:
            out.update({k: round(v, digits) if digits is not None and isinstance(v, float) else v
                        for k, v in got.items()})
            out.setdefault(f"{name}_seconds", round(time.perf_counter() - start, 1))
    return out


@register_protocol("knn", columns=lambda runs, opts, ev: {"k-NN top-1": spread_cell(runs, "knn_top1")},
                   note=lambda opts, ev: f"k-NN: k = {ev.knn_k}, cosine, the training split as the bank")
def knn_protocol(probe: Probe, opts: None) -> dict[str, float]:
    """Weighted k-NN top-1 (``eval.knn_k``, ``eval.knn_temperature``), a bank of at most
    ``eval.max_train`` training images; scored on the run's device."""
    if (got := probe.features()) is None:
        return {}
    (ftr, ytr), (fte, yte) = got
    ev = probe.eval
    return {"knn_top1": knn_accuracy(ftr.to(probe.device), ytr, fte, yte, ev.knn_k, ev.knn_temperature)}


@register_protocol("linear", columns=lambda runs, opts, ev: {"linear probe top-1": spread_cell(runs, "linear_top1")},
                   note=lambda opts, ev: "linear probe: BatchNorm + linear on frozen CLS features, SGD at lr 0.1")
def linear_protocol(probe: Probe, opts: None) -> dict[str, float]:
    """The fast linear probe (BatchNorm without affine + linear, SGD for 30 epochs at learning rate
    0.1, :data:`mimco.eval.linear.DEFAULT_LR`, on features extracted once); ``mimco linprobe`` tunes it."""
    if (got := probe.features()) is None:
        return {}
    (ftr, ytr), (fte, yte) = got
    return {"linear_top1": linear_probe(*[t.to(probe.device) for t in (ftr, ytr, fte, yte)], seed=probe.seed)}


@dataclass
class FewOptions:
    """The few-label protocol's sizes (0: the run's ``eval.few_*`` key)."""

    per_class: int = setting(0, min=0, what="labelled images per class (0 = eval.few_per_class)")
    label_seeds: int = setting(0, min=0, what="the number of labelled subsets (0 = eval.few_label_seeds)")
    knn_k: int = setting(0, min=0, what="the neighbour count (0 = eval.few_knn_k)")


def _few(opts: FewOptions | None, ev: EvalConfig) -> tuple[int, int, int]:
    """(images per class, subsets, k) of the few-label protocol."""
    opts = opts or FewOptions()
    return opts.per_class or ev.few_per_class, opts.label_seeds or ev.few_label_seeds, opts.knn_k or ev.few_knn_k


def _few_columns(runs: list[dict[str, float]], opts: FewOptions, ev: EvalConfig) -> dict[str, str]:
    n, _, k = _few(opts, ev)
    return {f"k-NN {n}/class": spread_cell(runs, f"few_knn{k}_top1", "few_subsets"),
            f"linear {n}/class": spread_cell(runs, "few_linear_top1", "few_subsets")}


def _few_note(opts: FewOptions, ev: EvalConfig) -> str:
    n, seeds, k = _few(opts, ev)
    return (f"{n}/class: k-NN (k = {k}) and linear probe from {n} labelled images per class, mean ± std over "
            f"{seeds} subsets")


@register_protocol("few", options=FewOptions, columns=_few_columns, note=_few_note)
def few_protocol(probe: Probe, opts: FewOptions | None) -> dict[str, float]:
    """k-NN and the linear probe from ``per_class`` labelled images per class, mean and std over
    ``label_seeds`` balanced subsets (each 0: the run's ``eval.few_per_class``, ``eval.few_label_seeds``,
    ``eval.few_knn_k``)."""
    test = probe.split_features("test")
    n, seeds, k = _few(opts, probe.eval)
    values = probe_few_labels(probe.backbone, probe.splits[0], *(test or (None, None)), probe.data, probe.device, n,
                              seeds=tuple(range(seeds)), ks=(k,), temperature=probe.eval.knn_temperature,
                              linear={"seed": probe.seed})
    return {**spread_metrics(values, "few_", digits=None), "few_subsets": seeds} if values else {}


@dataclass
class SegDataOptions:
    """Segmentation data of a dense protocol, normalised as the probe's data."""

    dataset: str = setting("fmnist_scenes", what="the segmentation data: fmnist_scenes or segfolder (with root)")
    root: str = ""  # its folder ("" = the probe's data.root: Fashion-MNIST's, for the scenes)
    img_size: int = setting(56, min=1, what="the side the backbone reads (its position table resampled)")
    scenes: int = setting(2000, min=1, what="the number of training scenes (fmnist_scenes)")
    val_scenes: int = setting(500, min=1, what="the number of validation scenes (fmnist_scenes)")
    num_classes: int = setting(0, min=0, what="a plain folder's class count (0 = from the layout)")


@dataclass
class SegprobeOptions(SegDataOptions):
    """The frozen segmentation probe's data and heads (``mimco segprobe``'s, as a protocol)."""

    heads: int = setting(3, min=1, what="the heads trained (seeds 0..heads-1): mean and std of their mIoU")
    layers: int = setting(1, min=1, what="how many last blocks feed the head")
    epochs: int = setting(20, min=1, what="the heads' epochs")
    position: bool = True  # also the token position probe (mimco.eval.position), at grid=resampled
    position_share: bool = False  # also a column of the share of the tokens' variance that position explains
    # resampled: the backbone at img_size, its position table resampled; training: the backbone at its own
    # training size, the images resized to it (masks nearest-neighbour), predictions scored at img_size
    grid: Literal["resampled", "training"] = "resampled"


def segmentation_config(data: DataConfig, opts: SegDataOptions, overrides: list[str] = ()) -> SegmentationConfig:
    """The segmentation config of ``opts``' data, normalised as ``data`` (its root unless ``opts.root``),
    then ``overrides``."""
    return apply_overrides(SegmentationConfig(), [
        f"data.name={opts.dataset}", f"data.root={opts.root or data.root}", f"data.channels={data.channels}",
        f"data.mean={list(data.mean)}", f"data.std={list(data.std)}", "data.num_workers=0",
        f"data.img_size={opts.img_size}", f"seg.scenes={opts.scenes}", f"seg.val_scenes={opts.val_scenes}",
        f"seg.num_classes={opts.num_classes}", *overrides], model_keys=False)


_SEG_DATA: dict[str, tuple[SegmentationConfig, Any, Any]] = {}


def segmentation_data(data: DataConfig, opts: SegDataOptions) -> tuple[SegmentationConfig, Any, Any]:
    """(the config, training split, validation split) of ``opts``' segmentation data, normalised as
    ``data``; loaded once per process and kept."""
    scfg = segmentation_config(data, opts)
    key = repr((to_dict(scfg.data), to_dict(scfg.seg)))
    if key not in _SEG_DATA:
        _SEG_DATA.clear()  # one data set at a time
        _SEG_DATA[key] = (scfg, load_segmentation(scfg.data, scfg.seg, train=True),
                          load_segmentation(scfg.data, scfg.seg, train=False, verbose=False))
    return _SEG_DATA[key]


def _seg_columns(runs: list[dict[str, float]], opts: SegprobeOptions, ev: EvalConfig) -> dict[str, str]:
    name = "scenes" if opts.dataset == "fmnist_scenes" else opts.dataset
    if opts.grid == "training":
        return {f"{name} mIoU (training grid)": spread_cell(runs, "miou", "heads")}
    out = {f"{name} mIoU ({opts.img_size}px)": spread_cell(runs, "miou", "heads")}
    if opts.position:
        out["token position acc."] = spread_cell(runs, "position_acc")
    if opts.position and opts.position_share:
        out["position variance share"] = spread_cell(runs, "position_share")
    return out


def _seg_note(opts: SegprobeOptions, ev: EvalConfig) -> str:
    s, name = opts.img_size, "scenes" if opts.dataset == "fmnist_scenes" else opts.dataset
    val = f"{opts.val_scenes} validation scenes" if opts.dataset == "fmnist_scenes" else f"{opts.dataset} validation"
    if opts.grid == "training":
        return (f"{name} mIoU (training grid): the same probe with the backbone at its training size, the {val} "
                f"resized to it and scored at {s} px")
    text = (f"{name} mIoU ({s}px): the frozen segmentation probe on {val} of {s} x {s} px (position table "
            f"resampled), mean ± std over {opts.heads} heads")
    return text + ("; token position acc.: a linear probe of each patch token's grid position on the same images"
                   if opts.position else "") + ("; position variance share: the share (%) of the tokens' variance "
                                                "that position explains" if opts.position and opts.position_share
                                                else "")


@register_protocol("segprobe", options=SegprobeOptions, columns=_seg_columns, note=_seg_note)
def segprobe_protocol(probe: Probe, opts: SegprobeOptions) -> dict[str, float]:
    """The frozen segmentation probe (BatchNorm + 1x1 conv on the last ``opts.layers`` blocks' patch
    tokens, ``opts.heads`` heads) with the backbone at ``opts.img_size`` (its position table
    resampled; raw pixels: each patch's pixels), mIoU mean and std over the heads; with
    ``opts.position`` the token position probe (:mod:`mimco.eval.position`)."""
    scfg, train, val = segmentation_data(probe.data, opts)
    if opts.grid == "training":
        model, data = probe.backbone, dataclasses.replace(scfg.data, img_size=probe.data.img_size)
    else:
        model, data = probe.backbone_at(opts.img_size), scfg.data
    values, _ = segprobe(model, train, val, data, probe.device, opts.layers, probe.patch, opts.epochs,
                         seeds=tuple(range(opts.heads)), precision=probe.precision,
                         position=opts.position and opts.grid == "resampled")
    out = spread_metrics({k: v for k, v in values.items() if isinstance(v, list)}, digits=None)
    return {**out, "heads": opts.heads, **{k: v for k, v in values.items() if k.startswith("position_")}} if out else {}
