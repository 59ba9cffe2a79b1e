"""``mimco study SPEC``: runs (stage chains) x seeds x evaluation protocols, one table and the pictures.

A spec is a YAML file, or a bundled one by name (``demo``: ``configs/studies/demo.yaml``)::

    title: MoCo v3 teacher and MimCo student       # the table's first words
    overrides: []                                  # KEY=VALUE for every run, as on the command line
    runs:                                          # run folders, trained in this order
      teacher: {stage: teacher, config: fmnist_teacher}
      mimco: {stage: pretrain, config: fmnist_pretrain, teacher: teacher, overrides: [mask.ratio=0.6]}
      mask75: {stage: pretrain, config: fmnist_pretrain, teacher: teacher, seeds: first}  # the first seed alone
      long: {stage: teacher, config: fmnist_teacher, compute_of: [teacher, mimco]}  # epochs x their measured time
    rows:                                          # the table, top to bottom
      - {name: raw pixels, backbone: pixels}       # each patch's pixels (k-NN, linear probe: the image's)
      - {name: random-init ViT, backbone: random}  # the evaluated run's model, seed 0
      - {name: MoCo v3 teacher, run: teacher}
      - {name: MimCo student, run: mimco}
      - {name: mask 0.75, run: mask75, protocols: [knn, linear]}   # a row's own share of the protocols
    seeds: []                                      # []: the configs' seed; [0, 1, 2]: train.seed, folders <run>-s<seed>
    eval_run: mimco                                # whose data and eval keys score the rows (default: the last run)
    protocols: [knn, linear, few, few100=few, segprobe]   # registered protocols, a plugin's too; NAME=PROTOCOL: another
    options: {few100: {per_class: 100}, segprobe: {heads: 3}}   # instance of one, with options of its own
    pictures: [tsne, curves, attention, pca]
    shown: [MoCo v3 teacher, MimCo student]        # the rows the pictures show (default: all; runs for curves, ...)

Each run is a normal run folder under OUT (``teacher: NAME``: stage 2 learns from that run's
checkpoint, of the same seed). A finished run is reused (refused when its saved config differs
outside ``train``, but for ``train.seed`` and ``train.precision``), an interrupted one resumed; a
stopped one stops the study (:class:`~mimco.pipeline.StageStopped`) and the same command resumes
it. Every row is scored by its protocols on features extracted once per row and seed
(:class:`Probe`), each score kept in the row's folder (``study-eval.json``, keyed by the protocol,
its options and the data and eval keys) and reused. The cells are the protocols' own
(``register_protocol(columns=)``), mean ± std over the seeds (or, for one seed, over a protocol's
label subsets or heads). OUT/results.md and results.csv hold the table.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from mimco.config import BUNDLED, choices_text, load_config, parse_override, read_mapping, to_dict
from mimco.data.build import class_names, load_dataset
from mimco.distributed import is_main
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches
from mimco.eval.plots import attention_figure, curves_figure, denormalize, pca_figure, tsne_figure
from mimco.eval.protocols import (
    Probe,
    get_protocol,
    protocol_names,
    protocol_options,
    run_protocols,
    segmentation_data,
    table_cells,
)
from mimco.eval.results import write_table
from mimco.io import atomic_json
from mimco.models import create_vit
from mimco.models.export import timm_kwargs
from mimco.models.formats import load_backbone
from mimco.pipeline import STAGE_CONFIGS, run_or_reuse, setup
from mimco.runs import CHECKPOINT, CONFIG, is_finished

#: the bundled specs (``mimco study demo``)
STUDIES = BUNDLED / "studies"
#: what a row without a run is: raw pixels; the evaluated run's model as at its step 0 (mimco's
#: initialisation of its config, torch seed 0); the same shape with timm's default initialisation
BACKBONES = ("pixels", "random", "random-timm")
#: raw pixels are a row only up to this many numbers per image (the k-NN bank holds them all)
MAX_PIXEL_FEATURES = 64 * 64 * 3
PICTURES = ("tsne", "curves", "attention", "pca")
TSNE_POINTS = 2000  # test images per t-SNE panel


@dataclass
class RunSpec:
    """One run folder of a study: its stage, config (a file or a bundled name) and overrides, and
    for stage 2 the run it learns from."""

    stage: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    teacher: str = ""
    seeds: str = "all"  # all: every seed of the study; first: its first seed alone
    compute_of: list[str] = field(default_factory=list)  # epochs x (these runs' seconds / the first's)


@dataclass
class RowSpec:
    """One row of the table: a run's backbone, or ``backbone`` (pixels, random) for a row without one."""

    name: str
    run: str = ""
    backbone: str = ""
    protocols: list[str] | None = None  # None: the study's


@dataclass
class StudySpec:
    name: str
    runs: dict[str, RunSpec]
    rows: list[RowSpec]
    title: str = ""
    overrides: list[str] = field(default_factory=list)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # {teacher: [...], pretrain: [...]}
    seeds: list[int] = field(default_factory=list)
    teacher_seed: int | None = None  # every student learns from this seed's teacher (None: its own seed's)
    folders: str = ""  # the run folders' parent under OUT ("": OUT itself)
    eval_run: str = ""
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pictures: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)

    def protocol_of(self, instance: str) -> str:
        """The registered protocol behind ``instance`` (``few100=few`` -> few)."""
        return self.instances()[instance]

    def instances(self) -> dict[str, str]:
        """{instance name: protocol name} in the order of ``protocols``."""
        return {e.split("=", 1)[0]: e.split("=", 1)[-1] for e in self.protocols}


def _keys(where: str, given: dict, allowed: list[str]) -> None:
    for k in given:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; keys: {', '.join(allowed)}"
            raise MimcoError(f"{where}: unknown key '{k}'{hint}")


#: an example of each list a spec holds, for the message that asks for one
_EXAMPLES = {"seeds": "[0, 1, 2]", "protocols": "[knn, linear]", "pictures": "[tsne, curves]", "shown": "[ROW, ROW]",
             "compute_of": "[teacher, mimco]"}


def _strings(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        example = _EXAMPLES.get(where.rsplit(": ", 1)[-1].split(".")[0], "[optim.epochs=2]")
        raise MimcoError(f"{where} must be a list, e.g. {example}; got {value!r}")
    return [str(v) for v in value]


def spec_path(spec: str | Path) -> Path:
    """The spec file: ``spec`` as given, or the bundled spec of that name."""
    p = Path(spec)
    if p.is_file():
        return p
    bundled = STUDIES / (p.name if p.name.endswith(".yaml") else f"{p.name}.yaml")
    if bundled.is_file() and p.parent == Path("."):
        return bundled
    names = sorted(f.stem for f in STUDIES.glob("*.yaml"))
    raise MimcoError(f"study spec not found: {spec}; pass a YAML file or a bundled spec ({choices_text(names)})")


def load_spec(spec: str | Path) -> StudySpec:
    """The checked spec of a file or bundled name: every key known, every run, row, protocol and
    picture resolvable, each mistake one line naming the fix."""
    path = spec_path(spec)
    raw = read_mapping(path, "study spec", "a mapping (runs:, rows:, protocols:, ...)")
    fields = [f.name for f in dataclasses.fields(StudySpec) if f.name != "name"]
    _keys(str(path), raw, fields)
    if not isinstance(raw.get("runs"), dict) or not raw["runs"]:
        raise MimcoError(f"{path}: 'runs' must map run names to {{stage: teacher|pretrain, config: ...}}")
    runs = {}
    for name, r in raw["runs"].items():
        where = f"{path}: run '{name}'"
        if not isinstance(r, dict):
            raise MimcoError(f"{where} must be a mapping like {{stage: teacher, config: fmnist_teacher}}")
        _keys(where, r, [f.name for f in dataclasses.fields(RunSpec)])
        if r.get("stage") not in ("teacher", "pretrain"):
            raise MimcoError(f"{where}: stage must be teacher or pretrain, not {r.get('stage')!r}")
        teacher = str(r.get("teacher") or "")
        if teacher and teacher not in runs:
            raise MimcoError(f"{where}: teacher '{teacher}' is not a run listed before it "
                             f"({', '.join(runs) or 'none'})")
        if teacher and r["stage"] != "pretrain":
            raise MimcoError(f"{where}: only a pretrain run learns from a teacher; drop 'teacher'")
        if r.get("seeds", "all") not in ("all", "first"):
            raise MimcoError(f"{where}: seeds must be all or first, not {r['seeds']!r}")
        compute = _strings(f"{where}: compute_of", r.get("compute_of"))
        if any(c not in runs for c in compute):
            raise MimcoError(f"{where}: compute_of names runs listed before it ({', '.join(runs) or 'none'}), "
                             f"not {compute}")
        seeds = r.get("seeds", "all")
        narrower = [t for t in [teacher, *compute] if t and runs[t].seeds == "first" and seeds == "all"]
        if narrower:
            raise MimcoError(f"{where} trains for every seed but '{narrower[0]}' for the first alone; give it "
                             "seeds: first too (or the other seeds: all)")
        runs[str(name)] = RunSpec(r["stage"], r.get("config"), _strings(f"{where}: overrides", r.get("overrides")),
                                  teacher, seeds, compute)
    rows = []
    for r in raw.get("rows") or []:
        if not isinstance(r, dict) or "name" not in r:
            raise MimcoError(f"{path}: each row is {{name: ..., run: RUN}} or {{name: ..., backbone: pixels|random}}")
        _keys(f"{path}: row '{r['name']}'", r, [f.name for f in dataclasses.fields(RowSpec)])
        row = RowSpec(str(r["name"]), str(r.get("run") or ""), str(r.get("backbone") or ""),
                      _strings(f"{path}: row '{r['name']}': protocols", r["protocols"]) if "protocols" in r else None)
        if bool(row.run) == bool(row.backbone):
            raise MimcoError(f"{path}: row '{row.name}' needs either run: (one of {', '.join(runs)}) or backbone: "
                             "pixels|random")
        if row.run and row.run not in runs:
            raise MimcoError(f"{path}: row '{row.name}': run '{row.run}' is not among the runs ({', '.join(runs)})")
        if row.backbone and row.backbone not in BACKBONES:
            raise MimcoError(f"{path}: row '{row.name}': backbone must be {choices_text(list(BACKBONES))}")
        rows.append(row)
    if not rows:
        raise MimcoError(f"{path}: 'rows' is empty; list the table's rows ({{name: ..., run: RUN}})")
    stages = raw.get("stage_overrides") or {}
    if not isinstance(stages, dict) or any(k not in ("teacher", "pretrain") for k in stages):
        raise MimcoError(f"{path}: stage_overrides maps teacher and pretrain to override lists, not {stages!r}")
    s = StudySpec(path.stem, runs, rows, str(raw.get("title") or ""), _strings(f"{path}: overrides",
                  raw.get("overrides")), {k: _strings(f"{path}: stage_overrides.{k}", v) for k, v in stages.items()},
                  [int(v) for v in _strings(f"{path}: seeds", raw.get("seeds"))],
                  None if raw.get("teacher_seed") is None else int(raw["teacher_seed"]), str(raw.get("folders") or ""),
                  str(raw.get("eval_run") or list(runs)[-1]),
                  _strings(f"{path}: protocols", raw.get("protocols", ["knn", "linear"])),
                  dict(raw.get("options") or {}), _strings(f"{path}: pictures", raw.get("pictures")),
                  _strings(f"{path}: shown", raw.get("shown")))
    if s.eval_run not in runs:
        raise MimcoError(f"{path}: eval_run '{s.eval_run}' is not among the runs ({', '.join(runs)})")
    bad = [p for p in s.pictures if p not in PICTURES]
    if bad:
        raise MimcoError(f"{path}: unknown picture '{bad[0]}'; choose {choices_text(list(PICTURES))}")
    names = [r.name for r in rows]
    bad = [n for n in s.shown if n not in names]
    if bad:
        raise MimcoError(f"{path}: shown: '{bad[0]}' is not a row ({', '.join(names)})")
    check_protocols(s)
    return s


def check_protocols(s: StudySpec) -> dict[str, Any]:
    """Every protocol known, its options valid and every row's protocols the study's, before
    anything trains; {instance: options}."""
    inst = s.instances()
    for protocol in inst.values():
        get_protocol(protocol)
    extra = sorted(set(s.options) - set(inst))
    if extra:
        raise MimcoError(f"options for '{extra[0]}', which is not among the protocols {list(inst)}")
    for row in s.rows:
        bad = [n for n in row.protocols or [] if n not in inst]
        if bad:
            raise MimcoError(f"row '{row.name}': protocol '{bad[0]}' is not among the study's ({', '.join(inst)})")
    return {n: protocol_options(p, s.options.get(n)) for n, p in inst.items()}


def with_overrides(s: StudySpec, texts: list[str] | tuple[str, ...]) -> StudySpec:
    """A copy of ``s`` with command-line overrides: ``RUN:KEY=VALUE`` for one run, ``PROTOCOL.key=value``
    for a protocol of the spec, ``KEY=VALUE`` for every run."""
    s = dataclasses.replace(s, runs={k: dataclasses.replace(r, overrides=list(r.overrides)) for k, r in s.runs.items()},
                            overrides=list(s.overrides), options={k: dict(v) for k, v in s.options.items()},
                            stage_overrides={k: list(v) for k, v in s.stage_overrides.items()})
    for text in texts:
        keys, value = parse_override(text)
        run, colon, first = keys[0].partition(":")
        if colon:
            if run not in s.runs:
                raise MimcoError(f"'{text}' names the run '{run}', which the study has not; runs: {', '.join(s.runs)}")
            s.runs[run].overrides.append(text.split(":", 1)[1])
        elif keys[0] in s.instances() and len(keys) == 2:
            s.options.setdefault(keys[0], {})[keys[1]] = value
        elif keys[0] in protocol_names() and len(keys) == 2:
            raise MimcoError(f"'{text}' sets an option of {keys[0]}, which this study does not run "
                             f"(protocols: {', '.join(s.protocols)})")
        else:
            s.overrides.append(text)
    check_protocols(s)
    return s


def spec_dict(s: StudySpec) -> dict[str, Any]:
    """``s`` as the YAML mapping :func:`load_spec` reads (defaults left out)."""
    def compact(obj: Any, default: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(obj).items() if v != getattr(default, k, None) and k != "name"}

    out = compact(s, StudySpec("", {}, []))
    out["runs"] = {k: {"stage": r.stage} | compact(r, RunSpec(r.stage)) for k, r in s.runs.items()}
    out["rows"] = [{"name": r.name} | compact(r, RowSpec(r.name)) for r in s.rows]
    return out


def folder(run: str, seed: int | None) -> str:
    """The run folder's name: the run's, with ``-s<seed>`` when the study lists seeds."""
    return run if seed is None else f"{run}-s{seed}"


def _changed(saved: Any, now: Any) -> bool:
    """Whether a key of the saved config has another value now (keys a newer mimco added are not in
    ``saved`` and do not count)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return any(k not in now or _changed(v, now[k]) for k, v in saved.items())
    return saved != now


def _recipe(cfg: dict, study_teacher: bool = False) -> dict:
    """A saved or built config (as a dict) without what does not change the trained weights: the
    ``eval`` section (scores are keyed by it), the ``train`` section but ``train.seed`` and
    ``train.precision`` (a run cut short by ``train.max_steps`` resumes), and with ``study_teacher``
    (the teacher is a run of the study, checked itself) the teacher checkpoint as its run folder's
    name, so a moved study folder is reused."""
    out = {k: v for k, v in cfg.items() if k != "eval"}
    out["train"] = {k: cfg.get("train", {}).get(k) for k in ("seed", "precision")}
    if study_teacher and isinstance(cfg.get("teacher"), dict):
        out["teacher"] = {**cfg["teacher"], "checkpoint": Path(str(cfg["teacher"].get("checkpoint", ""))).parent.name}
    return out


def _same_recipe(run_dir: Path, cfg: Any, study_teacher: bool) -> None:
    """Refuse a run folder whose saved config differs from ``cfg`` in its :func:`_recipe`."""
    saved = run_dir / CONFIG
    if saved.is_file() and _changed(_recipe(yaml.safe_load(saved.read_text()) or {}, study_teacher),
                                    _recipe(to_dict(cfg), study_teacher)):
        raise MimcoError(f"{run_dir} was trained with another configuration; give the study a fresh --out (or "
                         "remove that folder)")


def _train(s: StudySpec, out: Path, seeds: list[int | None]) -> tuple[dict, dict, dict]:
    """Every run of ``s`` for each of its seeds in ``out``: ({(run, seed): config}, {(run, seed): train
    seconds}, {(run, seed): folder}). Every folder's config is checked against the spec's before any
    run trains. With ``s.teacher_seed``, stage-1 runs train for that seed alone and every student
    learns from it (a student of another seed's teacher in ``<run>-s<seed>-t<teacher seed>``)."""
    fixed = s.teacher_seed
    plan = []  # (run, seed, folder, overrides) in training order
    for seed in ([fixed] if fixed is not None and fixed not in seeds else []) + seeds:
        for name, r in s.runs.items():
            if r.seeds == "first" and seed != seeds[0]:
                continue
            if fixed is not None and ((r.stage == "teacher" and seed != fixed) or (r.stage != "teacher"
                                                                                   and seed not in seeds)):
                continue
            tseed = seed if fixed is None else fixed
            f = folder(name, seed) + (f"-t{tseed}" if r.teacher and tseed != seed else "")
            plan.append((name, seed, f, [
                f"train.out_dir={out}", f"train.name={f}",
                *([f"teacher.checkpoint={out / folder(r.teacher, tseed) / CHECKPOINT}"] if r.teacher else []),
                *s.overrides, *s.stage_overrides.get(r.stage, []), *r.overrides,
                *([f"train.seed={seed}"] if seed is not None else [])]))
    cfgs: dict[tuple[str, int | None], Any] = {}
    for name, seed, f, over in plan:
        r = s.runs[name]
        cfgs[(name, seed)] = load_config(STAGE_CONFIGS[r.stage], r.config, over)
        if not r.compute_of:  # a run sized by others' measured time is checked once they ran
            _same_recipe(out / f, cfgs[(name, seed)], bool(r.teacher))
    seconds: dict[tuple[str, int | None], float] = {}
    dirs: dict[tuple[str, int | None], Path] = {}
    for name, seed, f, over in plan:
        r, cfg = s.runs[name], cfgs[(name, seed)]
        if r.compute_of:  # the measured compute of those runs, as epochs of this one
            first, *rest = (seconds.get((c, seed), seconds.get((c, fixed), 0.0)) for c in r.compute_of)
            epochs = cfg.optim.epochs * (first + sum(rest)) / max(first, 1e-9)
            cfg = load_config(STAGE_CONFIGS[r.stage], r.config, [*over, f"optim.epochs={epochs:.3f}"])
            cfgs[(name, seed)] = cfg
            _same_recipe(out / f, cfg, bool(r.teacher))
        dirs[(name, seed)] = out / f
        seconds[(name, seed)] = run_or_reuse(r.stage, cfg, out / f, say=s.name).get("train_seconds", 0.0)
        if not is_finished(out / f):  # train.max_steps: a study scores finished runs alone
            raise MimcoError(f"run {f} stopped at train.max_steps={cfg.train.max_steps}, before the end of its "
                             "schedule; a study scores finished runs: drop train.max_steps (the run resumes)")
    return cfgs, seconds, dirs


def _score(probe: Probe, instances: list[str], s: StudySpec, options: dict, cache: Path, ident: Any) -> dict:
    """{instance: metrics} of ``probe`` for each of ``instances``, each read from ``cache`` (a JSON
    file) when scored before with the same protocol, options, data and eval keys and model
    (``ident``: its run's config, or what builds it), else scored and kept."""
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    got = {}
    for n in instances:
        opts = options[n]
        what = [s.protocol_of(n), to_dict(opts) if opts is not None else None, to_dict(probe.data),
                to_dict(probe.eval), ident]
        key = f"{n}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"
        if key not in kept:
            scored = run_protocols([s.protocol_of(n)], probe, {s.protocol_of(n): opts}, digits=None)
            if not scored or not is_main():  # under torchrun the main process scores and keeps
                got[n] = scored
                continue
            kept[key] = scored
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(cache, kept)
        got[n] = kept[key]
    return got


def run_study(s: StudySpec, out: Path, quick: bool = False, table: str = "results") -> str:
    """Train (or resume, or reuse) every run of ``s`` for each seed in ``out``, score every row with
    its protocols, write ``<table>.md`` / ``<table>.csv`` and the pictures; returns the table."""
    start = time.perf_counter()
    say = s.name
    options = check_protocols(s)
    out.mkdir(parents=True, exist_ok=True)
    seeds: list[int | None] = list(s.seeds) or [None]
    runs_dir = out / s.folders if s.folders else out
    cfgs, seconds, dirs = _train(s, runs_dir, seeds)
    train_minutes = sum(seconds.values()) / 60 / len(seeds)

    first = next(k for k in cfgs if k[0] == s.eval_run)  # the evaluated run, its first seed
    ecfg = cfgs[first]
    data, ev = ecfg.data, ecfg.eval
    print(f"[{say}] evaluating {len(s.rows)} rows x {len(seeds)} seed(s) with {', '.join(s.instances())} on "
          f"{data.name}", file=sys.stderr, flush=True)
    eval_start = time.perf_counter()
    device = setup(ecfg)
    splits = load_dataset(data, train=True), load_dataset(data, train=False)

    def maker(row: RowSpec, seed: int | None) -> Any:
        """The row's backbone built for ``side``-px images (None: raw pixels)."""
        if row.backbone == "pixels":
            return lambda side: None
        if row.backbone.startswith("random"):
            timm = row.backbone == "random-timm"
            shape = timm_kwargs(load_backbone(str(dirs[first] / CHECKPOINT))[0]) if timm else {}

            def random_vit(side: int) -> torch.nn.Module:
                torch.manual_seed(0)
                return VisionTransformer(**{**shape, "img_size": side}) if timm else create_vit(ecfg.model, side,
                                                                                               data.channels)
            return random_vit
        ckpt = str(dirs[(row.run, seed)] / CHECKPOINT)
        return lambda side: load_backbone(ckpt, img_size=side)[0]

    shown = s.shown or [r.name for r in s.rows]
    cells_of, panels, headers = [], [], {n: {} for n in s.instances()}  # each instance's columns, in order
    for row in s.rows:
        instances = row.protocols if row.protocols is not None else list(s.instances())
        row_seeds = [sd for sd in seeds if (row.run, sd) in cfgs] if row.run else seeds[:1]
        if row.backbone == "pixels" and data.channels * data.img_size ** 2 > MAX_PIXEL_FEATURES:
            print(f"[{say}] {row.name} skipped: {data.img_size} px images are too large to use as features",
                  file=sys.stderr, flush=True)
            row_seeds = []
        metrics: dict[str, list[dict]] = {n: [] for n in instances}
        for seed in row_seeds:  # raw pixels and the random-init ViT (torch seed 0): once
            make = maker(row, seed)
            model = make(data.img_size)
            where = dirs[(row.run, seed)] if row.run else runs_dir / row.name.replace(" ", "-").lower()
            probe = Probe(model.to(device) if model is not None else None, data, splits, ev, device, "fp32",
                          seed=0, batch_size=512, patch=ecfg.model.patch_size if model is None else 0,
                          at_size=make if model is not None else None, folder=where)
            ident = (_recipe(to_dict(cfgs[(row.run, seed)]), bool(s.runs[row.run].teacher)) if row.run else
                     [row.backbone, to_dict(ecfg.model), data.img_size, str(dirs[first])])
            for n, m in _score(probe, instances, s, options, where / "study-eval.json", ident).items():
                metrics[n].append(m)
            got = probe.split_features("test") if "tsne" in s.pictures and row.name in shown else None
            if seed == row_seeds[0] and got is not None:  # None on every process but the main one
                panels.append((row.name, got[0][:TSNE_POINTS], got[1][:TSNE_POINTS]))
        cells = {"model": row.name, **({"seeds": str(len(row_seeds))} if s.seeds else {}),
                 "train minutes": _minutes(s, row, row_seeds, seconds)}
        for n in instances:
            got = table_cells(s.protocol_of(n), metrics[n], options[n], ev)
            headers[n].update(dict.fromkeys(got))
            cells.update(got)
        cells_of.append(cells)
        print(f"[{say}] {row.name}: " + "  ".join(f"{k} {v}" for k, v in cells.items() if k != "model"),
              file=sys.stderr, flush=True)
    m = ecfg.model
    header = (f"{s.title + ': ' if s.title else ''}{data.name} test top-1 (%), ViT {data.img_size}px/patch "
              f"{m.patch_size}, width {m.embed_dim}, depth {m.depth}; "
              + "".join(f"{note}; " for n, p in s.instances().items() if (note := protocol_note(p, options[n], ev)))
              + (f"mean ± std over seeds {', '.join(map(str, s.seeds))}; " if len(seeds) > 1 else "")
              + f"{torch.get_num_threads()} threads; training {train_minutes:.1f} min + evaluation "
              f"{(time.perf_counter() - eval_start) / 60:.1f} min{' (quick)' if quick else ''}")
    columns = [*list(cells_of[0])[:2 + bool(s.seeds)], *[h for n in s.instances() for h in headers[n]]]
    md = write_table([{c: r.get(c, "-") for c in columns} for r in cells_of], out, header, table)
    print("\n" + md)
    _pictures(s, out, shown, maker, seeds[0], panels, splits[1], data, options, device, dirs)
    print(f"[{say}] wrote {out / (table + '.md')}, {out / (table + '.csv')}"
          + "".join(f", {p}.png" for p in s.pictures) + f" ({(time.perf_counter() - start) / 60:.1f} min in all)",
          file=sys.stderr, flush=True)
    return md


def _pictures(s: StudySpec, out: Path, shown: list[str], maker: Any, seed: int | None, panels: list, test: Any,
              data: Any, options: dict, device: torch.device, dirs: dict) -> None:
    """``s.pictures`` of the shown rows: t-SNE of their test features (``panels``), the runs' curves,
    their CLS attention on 8 test images and their patch tokens' PCA on 8 segprobe images."""
    runs = [row for row in s.rows if row.run and row.name in shown and (row.run, seed) in dirs]
    if "tsne" in s.pictures:
        tsne_figure(panels, out / "tsne.png", class_names=class_names(data))
    if "curves" in s.pictures:
        curves_figure([dirs[(row.run, seed)] for row in runs], out / "curves.png")
    if "attention" in s.pictures:
        x, _ = next(iter(eval_batches(test, data, 8, device)))
        attention_figure([(row.name, maker(row, seed)(data.img_size).to(device)) for row in runs], x,
                         denormalize(x, data.mean, data.std), out / "attention.png")
    if "pca" in s.pictures:
        from mimco.eval.segmentation import val_batches

        seg = [n for n, p in s.instances().items() if p == "segprobe"]
        opts = options[seg[0]] if seg else protocol_options("segprobe")
        scfg, _, val = segmentation_data(data, opts)
        x = next(iter(val_batches(val, scfg.data, 8)))[0].to(device)
        pca_figure([(row.name, maker(row, seed)(opts.img_size).to(device)) for row in runs], x,
                   denormalize(x, scfg.data.mean, scfg.data.std), out / "pca.png")


def protocol_note(name: str, opts: Any, ev: Any) -> str:
    """What protocol ``name``'s columns are, for the table's header ("" when it says nothing)."""
    note = get_protocol(name).note
    return note(opts, ev) if note is not None else ""


def _minutes(s: StudySpec, row: RowSpec, seeds: list[int | None], seconds: dict) -> str:
    """A row's training minutes: its run's and those of the runs it learnt from (mean over seeds)."""
    if row.backbone:
        return "-" if row.backbone == "pixels" else "0"
    if not seeds:  # its run trained for none of the study's seeds (a teacher_seed outside them)
        return "-"
    chain, run = [], row.run
    while run:
        chain.append(run)
        run = s.runs[run].teacher

    def sec(run: str, seed: int | None) -> float:  # a teacher of another seed (teacher_seed) counts too
        return seconds.get((run, seed), seconds.get((run, s.teacher_seed), 0.0))

    own = sum(sec(chain[0], seed) for seed in seeds) / len(seeds) / 60
    total = sum(sec(r, seed) for r in chain for seed in seeds) / len(seeds) / 60
    return f"{total:.1f}" if len(chain) == 1 else f"{total:.1f} ({' + '.join(reversed(chain[1:]))} + {own:.1f})"
