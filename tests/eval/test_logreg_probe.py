"""examples/logreg_probe.py, an evaluation protocol defined outside the package in one file: it
scores what scikit-learn scores on the same features, and runs from ``mimco probe``, at the end of a
training run (``eval.protocols``) and beside the other protocols, with its options checked."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mimco.cli.main import main
from mimco.config import PretrainConfig, load_config
from mimco.data.build import load_dataset
from mimco.errors import MimcoError
from mimco.eval.features import extract_features
from mimco.eval.protocols import Probe, protocol_options, run_protocols
from mimco.models import create_vit
from mimco.plugins import load_file
from tests.helpers import ROOT, TINY_DATA, TINY_MODEL, TINY_RUN

LOGREG = ROOT / "examples" / "logreg_probe.py"
logreg = load_file(LOGREG)  # registers the protocol, as --plugin does


def test_it_scores_what_scikit_learn_scores_on_the_same_features():
    cfg = load_config(PretrainConfig, None, [*TINY_DATA, *TINY_MODEL])
    torch.manual_seed(0)
    vit = create_vit(cfg.model, cfg.data.img_size).eval()
    splits = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    got = run_protocols(["logreg"], Probe(vit, cfg.data, splits, cfg.eval, torch.device("cpu")),
                        {"logreg": protocol_options("logreg", {"c": 0.5})})
    # the reference: the features standardised by hand, scikit-learn's L-BFGS fit
    (ftr, ytr), (fte, yte) = [extract_features(vit, s, cfg.data, torch.device("cpu")) for s in splits]
    xtr, xte = ftr.double().numpy(), fte.double().numpy()
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1.0

    def reference(c: float) -> float:
        model = LogisticRegression(C=c, max_iter=1000, random_state=0).fit((xtr - mu) / sd, ytr.numpy())
        return float((model.predict((xte - mu) / sd) == yte.numpy()).mean() * 100)

    assert got["logreg_top1"] == round(reference(0.5), 2)
    assert logreg.fit_and_score((ftr, ytr), (fte, yte), 1e-3, 1000) == pytest.approx(reference(1e-3))
    with pytest.raises(MimcoError, match="logreg.c=0.0 is out of range"):
        protocol_options("logreg", {"c": 0})


def test_it_runs_from_mimco_probe_and_at_the_end_of_a_run(tmp_path, capsys):
    plugin = ["--plugin", str(LOGREG)]
    run = [*TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=32", "moco.proj_dim=16", f"train.out_dir={tmp_path}",
           "eval.at_end=true", "eval.knn_k=5"]
    assert main(["teacher", *plugin, *run, "eval.protocols=[knn,logreg]", "train.name=t"]) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert {"knn_top1", "logreg_top1", "logreg_seconds"} <= set(summary)
    capsys.readouterr()
    assert main(["probe", "logreg,knn", str(tmp_path / "t" / "last.pt"), *plugin, "eval.knn_k=5",
                 "logreg.max_iter=1000", "--out", str(tmp_path / "rows")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["logreg_top1"] == summary["logreg_top1"] and got["knn_top1"] == summary["knn_top1"]
    row = json.loads((tmp_path / "rows" / "results.jsonl").read_text().splitlines()[0])
    assert row["config"]["options"] == {"logreg": {"c": 1.0, "max_iter": 1000, "pool": "cls"}}
    assert main(["probe", "logreg", str(tmp_path / "t" / "last.pt"), *plugin, "logreg.pool=max"]) == 2
    assert capsys.readouterr().err.strip() == "mimco: error: unknown logreg.pool 'max'; choose cls or mean"
