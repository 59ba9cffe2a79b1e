"""Evaluation protocols by name: mimco's own (knn, linear, few) score what the kernels score on the
same features, extracted once per call; the end of a run and ``mimco probe`` run the list they are
given, and a name nothing registers is refused before any data is read."""

from __future__ import annotations

import json

import pytest
import torch

import mimco.eval.protocols as protocols
from mimco.cli.main import main
from mimco.config import PretrainConfig, load_config
from mimco.data.build import load_dataset
from mimco.errors import MimcoError
from mimco.eval.features import extract_features
from mimco.eval.knn import knn_accuracy
from mimco.eval.linear import linear_probe
from mimco.models import create_vit
from tests.helpers import TINY_DATA, TINY_MODEL, TINY_RUN

CPU = torch.device("cpu")


def _probe(**kw):
    cfg = load_config(PretrainConfig, None, [*TINY_DATA, *TINY_MODEL, "eval.knn_k=5", "eval.few_per_class=4",
                                             "eval.few_label_seeds=2", "eval.few_knn_k=3"])
    torch.manual_seed(0)
    vit = create_vit(cfg.model, cfg.data.img_size).eval()
    splits = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    return protocols.Probe(vit, cfg.data, splits, cfg.eval, CPU, **kw), vit, cfg, splits


def test_builtin_protocols_score_what_the_kernels_score_and_extract_once(monkeypatch):
    probe, vit, cfg, splits = _probe()
    ftr, ytr = extract_features(vit, splits[0], cfg.data, CPU)
    fte, yte = extract_features(vit, splits[1], cfg.data, CPU)
    calls = []
    real = protocols.extract_features_distributed
    monkeypatch.setattr(protocols, "extract_features_distributed", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = protocols.run_protocols(["knn", "linear"], probe)
    assert len(calls) == 2  # the train and test features, once for both protocols
    assert got["knn_top1"] == round(knn_accuracy(ftr, ytr, fte, yte, 5, cfg.eval.knn_temperature), 2)
    assert got["linear_top1"] == round(linear_probe(ftr, ytr, fte, yte, seed=0), 2)
    assert {"knn_seconds", "linear_seconds"} <= set(got)
    few = protocols.run_protocols(["few"], probe)
    assert {"few_knn3_top1", "few_knn3_top1_std", "few_linear_top1", "few_linear_top1_std"} <= set(few)


def test_unknown_names_and_options_are_one_line():
    with pytest.raises(MimcoError, match=r"unknown evaluation protocol 'linaer'; choose .*knn.* \(did you mean "
                                         r"linear\?\)"):
        protocols.get_protocol("linaer")
    with pytest.raises(MimcoError, match="protocol knn takes no options; drop knn.k"):
        protocols.protocol_options("knn", {"k": 3})


def test_a_run_ends_with_its_protocols_and_refuses_an_unknown_one_before_any_data(tmp_path, capsys):
    run = [*TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=32", "moco.proj_dim=16",
           f"train.out_dir={tmp_path}"]
    assert main(["teacher", *run, "eval.at_end=true", "eval.protocols=[knn,bogus]", "train.name=bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mimco: error: unknown evaluation protocol 'bogus'")
    assert not (tmp_path / "bad").exists()
    assert main(["teacher", *run, "eval.at_end=true", "eval.protocols=[knn,linear]", "eval.knn_k=5",
                 "train.name=ok"]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert {"knn_top1", "linear_top1"} <= set(summary)
    # mimco probe: the same protocols on the checkpoint, the same numbers
    capsys.readouterr()
    assert main(["probe", "knn,linear", str(tmp_path / "ok" / "last.pt"), "eval.knn_k=5", "--out",
                 str(tmp_path / "rows")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["knn_top1"] == summary["knn_top1"] and got["linear_top1"] == summary["linear_top1"]
    row = json.loads((tmp_path / "rows" / "results.jsonl").read_text().splitlines()[0])
    assert row["command"] == "probe" and row["config"]["protocols"] == ["knn", "linear"]


def test_a_study_cell_pools_seeds_and_subsets_as_one_list_would():
    """Mean ± sample std over every (model seed, label subset) pair, from each seed's mean, std and
    count, equal to ``statistics`` over the pooled list; one seed: its own mean ± std."""
    import random
    import statistics

    rng = random.Random(0)
    values = [[rng.uniform(30, 60) for _ in range(n)] for n in (3, 3, 2)]
    runs = [{"top1": statistics.mean(v), "top1_std": statistics.stdev(v), "n": len(v)} for v in values]
    pooled = [x for v in values for x in v]
    assert protocols.spread_cell(runs, "top1", "n") == f"{statistics.mean(pooled):.1f} ± {statistics.stdev(pooled):.1f}"
    assert protocols.spread_cell(runs[:1], "top1", "n") == f"{runs[0]['top1']:.1f} ± {runs[0]['top1_std']:.1f}"
    means = [r["top1"] for r in runs]
    assert protocols.spread_cell(runs, "top1") == f"{statistics.mean(means):.1f} ± {statistics.stdev(means):.1f}"
    assert protocols.cell([]) == "-" and protocols.cell([71.04]) == "71.0"
