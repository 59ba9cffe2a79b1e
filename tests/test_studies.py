"""The study runner (``mimco study SPEC``, ``mimco demo``): the bundled demo spec end to end at toy
size (procedural images, a tiny ViT), seeds and a plugin's protocol in a spec of one's own, the
numbers against the probe functions called directly, and a bad spec or override as one line."""

import csv
import json
import statistics

import pytest
import yaml

import mimco
from mimco.cli.main import main
from mimco.errors import MimcoError
from mimco.studies import load_spec, run_study, with_overrides
from tests.helpers import ROOT, TINY_DATA, TINY_MODEL

TOY = [*TINY_DATA, *TINY_MODEL, "data.channels=3", "model.pos_embed=learned", "optim.epochs=1",
       "optim.warmup_epochs=0.25", "optim.batch_size=32", "train.progress=false", "train.log_every=2",
       "train.ckpt_every=0", "eval.few_per_class=3", "eval.few_label_seeds=2", "eval.few_knn_k=3",
       "teacher:moco.mlp_dim=64", "teacher:moco.proj_dim=32", "mimco:loss.head_hidden_dim=64"]
DENSE = ["segprobe.scenes=128", "segprobe.val_scenes=16", "segprobe.img_size=28"]  # 7 x 7 patches of 4


@pytest.mark.slow
def test_the_demo_spec_gives_every_row_column_and_picture_and_reuses_its_runs(tmp_path, capsys):
    md = mimco.study("demo", tmp_path, *TOY, *DENSE)  # the API: what `mimco demo` runs
    spec = with_overrides(load_spec("demo"), [*TOY, *DENSE])
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["model"] for r in rows] == ["raw pixels", "random-init ViT", "MoCo v3 teacher", "MimCo student"]
    assert list(rows[0]) == ["model", "train minutes", "k-NN top-1", "linear probe top-1", "k-NN 3/class",
                             "linear 3/class", "scenes mIoU (28px)", "token position acc."]
    assert rows[0]["train minutes"] == "-" and rows[1]["train minutes"] == "0"
    assert rows[3]["train minutes"].split(" (")[1].startswith("teacher + ")
    for r in rows:
        mean, std = (float(v) for v in r["k-NN 3/class"].split(" ± "))
        assert 0 <= mean <= 100 and std >= 0
        mean, std = (float(v) for v in r["scenes mIoU (28px)"].split(" ± "))  # 3 heads
        assert 0 < mean <= 100 and std >= 0 and 0 <= float(r["token position acc."]) <= 100
    assert "procedural test top-1" in md and "the frozen segmentation probe on 16 validation scenes of 28 x 28" in md
    assert "token position acc.: a linear probe of each patch token's grid position" in md
    for png in ("tsne.png", "curves.png", "attention.png", "pca.png"):
        assert (tmp_path / png).stat().st_size > 5_000
    capsys.readouterr()
    assert run_study(spec, tmp_path).split("\n", 1)[1] == md.split("\n", 1)[1]  # the same numbers again
    assert capsys.readouterr().err.count("reusing the finished run") == 2


@pytest.mark.slow
def test_seeds_and_a_plugins_protocol_in_a_spec_of_ones_own_score_as_the_probe_functions_do(tmp_path, capsys):
    """Two seeds of a teacher, scored by k-NN and the logistic-regression example (``--plugin``):
    each seed's run folder, and the cells equal to mean ± std of ``knn_accuracy`` and the example's
    own scorer on each seed's backbone's features, extracted independently."""
    import torch

    from examples.logreg_probe import fit_and_score
    from mimco.config import PretrainConfig, load_config
    from mimco.data.build import load_dataset
    from mimco.eval.features import extract_features
    from mimco.eval.knn import knn_accuracy
    from mimco.models.formats import load_backbone

    spec = tmp_path / "two-seeds.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "two seeds", "overrides": [o for o in TOY if ":" not in o] + ["moco.mlp_dim=64", "moco.proj_dim=32"],
        "runs": {"teacher": {"stage": "teacher"}}, "seeds": [0, 1],
        "rows": [{"name": "pixels", "backbone": "pixels"}, {"name": "teacher", "run": "teacher"}],
        "protocols": ["knn", "logreg"], "options": {"logreg": {"max_iter": 50}}}))
    out = tmp_path / "out"
    assert main(["study", str(spec), "--out", str(out), "--plugin", str(ROOT / "examples" / "logreg_probe.py")]) == 0
    assert (out / "teacher-s0" / "backbone.safetensors").is_file() and (out / "teacher-s1").is_dir()
    rows = {r["model"]: r for r in csv.DictReader((out / "results.csv").open())}
    cfg = load_config(PretrainConfig, None, [o for o in TOY if ":" not in o])
    splits = load_dataset(cfg.data, True), load_dataset(cfg.data, False)
    knn, logreg = [], []
    for seed in (0, 1):
        model, _ = load_backbone(str(out / f"teacher-s{seed}" / "last.pt"))
        feats = [extract_features(model, split, cfg.data, torch.device("cpu")) for split in splits]
        knn.append(knn_accuracy(*feats[0], *feats[1], cfg.eval.knn_k, cfg.eval.knn_temperature))
        logreg.append(fit_and_score(feats[0], feats[1], 1.0, 50))
    assert rows["teacher"]["k-NN top-1"] == f"{statistics.mean(knn):.1f} ± {statistics.stdev(knn):.1f}"
    assert rows["teacher"]["logreg_top1"] == f"{statistics.mean(logreg):.1f} ± {statistics.stdev(logreg):.1f}"
    assert " ± " not in rows["pixels"]["k-NN top-1"]  # a row without a run does not depend on the seed: scored once
    assert "mean ± std over seeds 0, 1" in (out / "results.md").read_text()


def _spec(tmp_path, **changes):
    base = {"runs": {"teacher": {"stage": "teacher"}}, "rows": [{"name": "teacher", "run": "teacher"}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**base, **changes}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"protocol": ["knn"]}, "unknown config key 'protocol'; did you mean protocols"),
    ({"runs": {"s": {"stage": "pretrain", "teacher": "t"}}}, "teacher 't' is not a run listed before it"),
    ({"runs": {"t": {"stage": "finetune"}}}, "unknown run.stage 'finetune'; choose teacher or pretrain"),
    ({"rows": [{"name": "x"}]}, "row 'x' needs either run:"),
    ({"rows": [{"name": "x", "run": "nope"}]}, "run 'nope' is not among the runs (teacher)"),
    ({"rows": [{"name": "x", "backbone": "noise"}]}, "backbone must be"),
    ({"protocols": ["knnn"]}, "unknown evaluation protocol 'knnn'"),
    ({"options": {"segprobe": {"heads": 2}}}, "options for 'segprobe', which is not among the protocols"),
    ({"protocols": ["segprobe"], "options": {"segprobe": {"heads": 0}}}, "segprobe.heads"),
    ({"pictures": ["tnse"]}, "unknown picture 'tnse'"),
    ({"eval_run": "student"}, "eval_run 'student' is not among the runs"),
    ({"runs": {"a": {"stage": "teacher", "seeds": "first"}, "b": {"stage": "pretrain", "teacher": "a"}}},
     "trains for every seed but 'a' for the first alone"),
    ({"seeds": 3}, "config key 'seeds' expects a list"),
])
def test_a_bad_spec_is_one_line_naming_the_fix(tmp_path, changes, message):
    with pytest.raises(MimcoError, match=None) as e:
        load_spec(_spec(tmp_path, **changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_go_to_a_run_a_protocol_or_every_run(tmp_path):
    spec = load_spec(_spec(tmp_path, protocols=["knn", "segprobe"]))
    s = with_overrides(spec, ["optim.epochs=2", "teacher:moco.mlp_dim=64", "segprobe.heads=2"])
    assert s.overrides == ["optim.epochs=2"] and s.runs["teacher"].overrides == ["moco.mlp_dim=64"]
    assert s.options == {"segprobe": {"heads": 2}} and spec.options == {}  # the spec itself is unchanged
    for bad, message in (("student:optim.epochs=1", "names the run 'student'"),
                         ("few.k=3", "sets an option of few, which this study does not run"),
                         ("knn.k=3", "protocol knn takes no options")):
        with pytest.raises(MimcoError, match=message):
            with_overrides(spec, [bad])


def test_the_command_line_refuses_a_missing_spec_in_one_line(tmp_path, capsys):
    assert main(["study", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimco: error: study spec not found") and "demo" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_run_cut_short_is_not_scored_and_a_scoring_key_does_not_retrain(tmp_path, capsys):
    """``train.max_steps`` ends a run before its schedule: the study refuses to score it in one line,
    and the same study without it resumes the run; an ``eval`` key changes the scores, not the runs."""
    spec = tmp_path / "one.yaml"
    spec.write_text(yaml.safe_dump({"overrides": [o for o in TOY if ":" not in o] + ["moco.mlp_dim=64",
                                                                                     "moco.proj_dim=32"],
                                    "runs": {"teacher": {"stage": "teacher"}},
                                    "rows": [{"name": "teacher", "run": "teacher"}], "protocols": ["knn"]}))
    out = str(tmp_path / "out")
    assert main(["study", str(spec), "--out", out, "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimco: error: run teacher stopped at train.max_steps=2") and "Traceback" not in err
    assert main(["study", str(spec), "--out", out]) == 0
    assert "teacher: resuming in" in capsys.readouterr().err
    assert main(["study", str(spec), "--out", out, "eval.knn_k=3"]) == 0
    assert "training in" not in capsys.readouterr().err
    scores = json.loads((tmp_path / "out" / "teacher" / "study-eval.json").read_text())
    assert len(scores) == 2  # k = 20 and k = 3, one run


@pytest.mark.parametrize("text, message", [
    ("runs: [teacher", "is not valid YAML"),
    ("- teacher", "must hold a mapping (runs:, rows:, protocols:, ...), not list"),
])
def test_a_spec_that_is_no_mapping_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MimcoError, match=None) as e:
        load_spec(path)
    assert message in str(e.value) and "\n" not in str(e.value)
