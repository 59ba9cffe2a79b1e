"""``mimco study SPEC``: runs (stage chains) x seeds x evaluation protocols, one table and the pictures. A spec
is a YAML file, or a bundled one by name (``demo``: ``configs/studies/demo.yaml``); its keys are the fields of
:class:`StudySpec`, :class:`RunSpec` and :class:`RowSpec`. docs/evaluation.md#studies shows one whole and says
which runs and scores are reused (a run folder whose :func:`_recipe` differs from the spec's is refused)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from mimco.config import BUNDLED, choices_text, load_config, load_section, parse_override, read_mapping, to_dict
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
#: what a row without a run is (:class:`RowSpec`)
BACKBONES = ("pixels", "random", "random-timm")
#: raw pixels are a row only up to this many numbers per image (the k-NN bank holds them all)
MAX_PIXEL_FEATURES = 64 * 64 * 3
PICTURES = ("tsne", "curves", "attention", "pca")
TSNE_POINTS = 2000  # test images per t-SNE panel


@dataclass
class RunSpec:
    """One run folder of a study: its stage, config (a file or a bundled name) and overrides, and
    for stage 2 the run it learns from (listed before it)."""

    stage: Literal["teacher", "pretrain"] = "teacher"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    teacher: str = ""
    seeds: Literal["all", "first"] = "all"  # all: every seed of the study; first: its first seed alone
    compute_of: list[str] = field(default_factory=list)  # epochs x (these runs' seconds / the first's)


@dataclass
class RowSpec:
    """One row of the table: a run's backbone, or ``backbone`` for a row without one: raw pixels,
    the evaluated run's model at step 0 (``random``: mimco's init, torch seed 0) or timm's init."""

    name: str = ""
    run: str = ""
    backbone: str = ""  # pixels | random | random-timm
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

    def instances(self) -> dict[str, str]:
        """{instance name: protocol name} in the order of ``protocols`` (``few100=few``: few100 -> few)."""
        return {e.split("=", 1)[0]: e.split("=", 1)[-1] for e in self.protocols}


#: the keys of a spec that are not lists of plain values, read apart by :func:`load_spec`
_MAPPINGS = ("runs", "rows", "stage_overrides", "options")


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


def _section(cls: type, values: Any, where: str, name: str) -> Any:
    """``values`` as a ``cls`` (typed, unknown keys named with the closest), each mistake one line
    starting with ``where``."""
    if not isinstance(values, dict):
        raise MimcoError(f"{where}: {name} must be a mapping of keys, not {values!r}")
    try:
        return load_section(cls, values, name)
    except MimcoError as e:
        raise MimcoError(f"{where}: {e}") from None


def load_spec(spec: str | Path) -> StudySpec:
    """The checked spec of a file or bundled name (each mistake one line naming the fix)."""
    path = spec_path(spec)
    raw = read_mapping(path, "study spec", "a mapping (runs:, rows:, protocols:, ...)")
    if not isinstance(raw.get("runs"), dict) or not raw["runs"]:
        raise MimcoError(f"{path}: 'runs' must map run names to {{stage: teacher|pretrain, config: ...}}")
    top = dataclasses.make_dataclass("Spec", [(f.name, f.type, f) for f in dataclasses.fields(StudySpec)
                                              if f.name not in ("name", *_MAPPINGS)])
    s = StudySpec(path.stem, {}, [], **vars(_section(top, {k: v for k, v in raw.items() if k not in _MAPPINGS},
                                                     str(path), "")))
    for name, r in raw["runs"].items():
        where = f"{path}: run '{name}'"
        run = s.runs[str(name)] = _section(RunSpec, r, where, "run")
        if "stage" not in r:
            raise MimcoError(f"{where}: give its stage (teacher or pretrain)")
        earlier = list(s.runs)[:-1]
        if run.teacher and run.teacher not in earlier:
            raise MimcoError(f"{where}: teacher '{run.teacher}' is not a run listed before it "
                             f"({', '.join(earlier) or 'none'})")
        if run.teacher and run.stage != "pretrain":
            raise MimcoError(f"{where}: only a pretrain run learns from a teacher; drop 'teacher'")
        if any(c not in earlier for c in run.compute_of):
            raise MimcoError(f"{where}: compute_of names runs listed before it ({', '.join(earlier) or 'none'}), "
                             f"not {run.compute_of}")
        narrower = [t for t in [run.teacher, *run.compute_of] if t and s.runs[t].seeds == "first"]
        if narrower and run.seeds == "all":
            raise MimcoError(f"{where} trains for every seed but '{narrower[0]}' for the first alone; give it "
                             "seeds: first too (or the other seeds: all)")
    for r in raw.get("rows") or []:
        row = _section(RowSpec, r, f"{path}: row '{r.get('name') if isinstance(r, dict) else r}'", "row")
        if not row.name or bool(row.run) == bool(row.backbone):
            raise MimcoError(f"{path}: row '{row.name}' needs either run: (one of {', '.join(s.runs)}) or backbone: "
                             "pixels|random, and a name")
        if row.run and row.run not in s.runs:
            raise MimcoError(f"{path}: row '{row.name}': run '{row.run}' is not among the runs ({', '.join(s.runs)})")
        if row.backbone and row.backbone not in BACKBONES:
            raise MimcoError(f"{path}: row '{row.name}': backbone must be {choices_text(list(BACKBONES))}")
        s.rows.append(row)
    if not s.rows:
        raise MimcoError(f"{path}: 'rows' is empty; list the table's rows ({{name: ..., run: RUN}})")
    stages = raw.get("stage_overrides") or {}
    if not isinstance(stages, dict) or any(k not in ("teacher", "pretrain") or not isinstance(v, list)
                                           for k, v in stages.items()):
        raise MimcoError(f"{path}: stage_overrides maps teacher and pretrain to override lists, not {stages!r}")
    s.stage_overrides = {k: [str(o) for o in v] for k, v in stages.items()}
    s.options = dict(raw.get("options") or {})
    s.eval_run = s.eval_run or list(s.runs)[-1]
    if s.eval_run not in s.runs:
        raise MimcoError(f"{path}: eval_run '{s.eval_run}' is not among the runs ({', '.join(s.runs)})")
    if bad := [p for p in s.pictures if p not in PICTURES]:
        raise MimcoError(f"{path}: unknown picture '{bad[0]}'; choose {choices_text(list(PICTURES))}")
    names = [r.name for r in s.rows]
    if bad := [n for n in s.shown if n not in names]:
        raise MimcoError(f"{path}: shown: '{bad[0]}' is not a row ({', '.join(names)})")
    check_protocols(s)
    return s


def check_protocols(s: StudySpec) -> dict[str, Any]:
    """Every protocol known, its options valid and every row's protocols the study's, before
    anything trains; {instance: options}."""
    inst = s.instances()
    for protocol in inst.values():
        get_protocol(protocol)
    if extra := sorted(set(s.options) - set(inst)):
        raise MimcoError(f"options for '{extra[0]}', which is not among the protocols {list(inst)}")
    for row in s.rows:
        if bad := [n for n in row.protocols or [] if n not in inst]:
            raise MimcoError(f"row '{row.name}': protocol '{bad[0]}' is not among the study's ({', '.join(inst)})")
    return {n: protocol_options(p, s.options.get(n)) for n, p in inst.items()}


def with_overrides(s: StudySpec, texts: list[str] | tuple[str, ...]) -> StudySpec:
    """A copy of ``s`` with command-line overrides: ``RUN:KEY=VALUE``, ``PROTOCOL.key=value``, ``KEY=VALUE``."""
    s = copy.deepcopy(s)
    for text in texts:
        keys, value = parse_override(text)
        run, colon, _ = keys[0].partition(":")
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

    return {**compact(s, StudySpec("", {}, [])),
            "runs": {k: {"stage": r.stage} | compact(r, RunSpec(r.stage)) for k, r in s.runs.items()},
            "rows": [{"name": r.name} | compact(r, RowSpec(r.name)) for r in s.rows]}


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
    """A saved or built config (as a dict) without what does not change the trained weights: the ``eval``
    section (scores are keyed by it), the ``train`` section but ``train.seed`` and ``train.precision`` (a run
    cut short by ``train.max_steps`` resumes), and with ``study_teacher`` (the teacher is a run of the study,
    checked itself) the teacher checkpoint as its run folder's name, so a moved study folder is reused."""
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
            wanted = [fixed] if fixed is not None and r.stage == "teacher" else seeds
            if seed not in wanted or (r.seeds == "first" and seed != seeds[0]):
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
    for name, seed, f, over in plan:
        r, cfg = s.runs[name], cfgs[(name, seed)]
        if r.compute_of:  # the measured compute of those runs, as epochs of this one
            first, *rest = (seconds.get((c, seed), seconds.get((c, fixed), 0.0)) for c in r.compute_of)
            epochs = cfg.optim.epochs * (first + sum(rest)) / max(first, 1e-9)
            cfg = load_config(STAGE_CONFIGS[r.stage], r.config, [*over, f"optim.epochs={epochs:.3f}"])
            cfgs[(name, seed)] = cfg
            _same_recipe(out / f, cfg, bool(r.teacher))
        seconds[(name, seed)] = run_or_reuse(r.stage, cfg, out / f, say=s.name).get("train_seconds", 0.0)
        if not is_finished(out / f):  # train.max_steps: a study scores finished runs alone
            raise MimcoError(f"run {f} stopped at train.max_steps={cfg.train.max_steps}, before the end of its "
                             "schedule; a study scores finished runs: drop train.max_steps (the run resumes)")
    return cfgs, seconds, {(name, seed): out / f for name, seed, f, _ in plan}


def _score(probe: Probe, instances: list[str], s: StudySpec, options: dict, cache: Path, ident: Any) -> dict:
    """{instance: metrics} of ``probe`` for each of ``instances``, each read from ``cache`` (a JSON
    file) when scored before with the same protocol, options, data and eval keys and model
    (``ident``: its run's config, or what builds it), else scored and kept."""
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    got = {}
    for n in instances:
        protocol, opts = s.instances()[n], options[n]
        what = [protocol, to_dict(opts) if opts is not None else None, to_dict(probe.data), to_dict(probe.eval), ident]
        key = f"{n}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"
        got[n] = kept[key] if key in kept else run_protocols([protocol], probe, {protocol: opts}, digits=None)
        if key not in kept and got[n] and is_main():  # under torchrun the main process scores and keeps
            kept[key] = got[n]
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(cache, kept)
    return got


def run_study(s: StudySpec, out: Path, quick: bool = False, table: str = "results") -> str:
    """Train (or resume, or reuse) every run of ``s`` for each seed in ``out``, score every row with
    its protocols, write ``<table>.md`` / ``<table>.csv`` and the pictures; returns the table."""
    start = time.perf_counter()
    options = check_protocols(s)
    out.mkdir(parents=True, exist_ok=True)
    seeds: list[int | None] = list(s.seeds) or [None]
    runs_dir = out / s.folders if s.folders else out
    cfgs, seconds, dirs = _train(s, runs_dir, seeds)
    train_minutes = sum(seconds.values()) / 60 / len(seeds)

    first = next(k for k in cfgs if k[0] == s.eval_run)  # the evaluated run, its first seed
    ecfg = cfgs[first]
    data, ev = ecfg.data, ecfg.eval
    print(f"[{s.name}] evaluating {len(s.rows)} rows x {len(seeds)} seed(s) with {', '.join(s.instances())} on "
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
            print(f"[{s.name}] {row.name} skipped: {data.img_size} px images are too large to use as features",
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
            got = table_cells(s.instances()[n], metrics[n], options[n], ev)
            headers[n].update(dict.fromkeys(got))
            cells.update(got)
        cells_of.append(cells)
        print(f"[{s.name}] {row.name}: " + "  ".join(f"{k} {v}" for k, v in cells.items() if k != "model"),
              file=sys.stderr, flush=True)
    notes = [(get_protocol(p).note, options[n]) for n, p in s.instances().items()]  # what the columns are
    header = (f"{s.title + ': ' if s.title else ''}{data.name} test top-1 (%), ViT {data.img_size}px/patch "
              f"{ecfg.model.patch_size}, width {ecfg.model.embed_dim}, depth {ecfg.model.depth}; "
              + "".join(f"{text}; " for note, opts in notes if note is not None and (text := note(opts, ev)))
              + (f"mean ± std over seeds {', '.join(map(str, s.seeds))}; " if len(seeds) > 1 else "")
              + f"{torch.get_num_threads()} threads; training {train_minutes:.1f} min + evaluation "
              f"{(time.perf_counter() - eval_start) / 60:.1f} min{' (quick)' if quick else ''}")
    columns = [*list(cells_of[0])[:2 + bool(s.seeds)], *[h for n in s.instances() for h in headers[n]]]
    md = write_table([{c: r.get(c, "-") for c in columns} for r in cells_of], out, header, table)
    print("\n" + md)
    # the pictures of the shown rows: t-SNE of their test features (``panels``), the runs' curves,
    # their CLS attention on 8 test images and their patch tokens' PCA on 8 segprobe images
    seed = seeds[0]
    runs = [row for row in s.rows if row.run and row.name in shown and (row.run, seed) in dirs]
    if "tsne" in s.pictures:
        tsne_figure(panels, out / "tsne.png", class_names=class_names(data))
    if "curves" in s.pictures:
        curves_figure([dirs[(row.run, seed)] for row in runs], out / "curves.png")
    if "attention" in s.pictures:
        x, _ = next(iter(eval_batches(splits[1], data, 8, device)))
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
    print(f"[{s.name}] wrote {out / (table + '.md')}, {out / (table + '.csv')}"
          + "".join(f", {p}.png" for p in s.pictures) + f" ({(time.perf_counter() - start) / 60:.1f} min in all)",
          file=sys.stderr, flush=True)
    return md


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
    sec = {(r, sd): seconds.get((r, sd), seconds.get((r, s.teacher_seed), 0.0))  # teacher_seed's teacher counts too
           for r in chain for sd in seeds}
    own = sum(sec[(chain[0], sd)] for sd in seeds) / len(seeds) / 60
    total = sum(sec[(r, sd)] for r in chain for sd in seeds) / len(seeds) / 60
    return f"{total:.1f}" if len(chain) == 1 else f"{total:.1f} ({' + '.join(reversed(chain[1:]))} + {own:.1f})"
