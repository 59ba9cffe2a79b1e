"""``mimco demo`` end to end at toy size (procedural images, a tiny ViT): both stages, the table
with its few-label and dense columns, the pictures, and the reuse of finished stages."""

import csv

import pytest

from mimco.cli.demo import run_demo
from tests.helpers import TINY_DATA, TINY_MODEL

TEACHER, STUDENT = ("moco.mlp_dim=64", "moco.proj_dim=32"), ("loss.head_hidden_dim=64",)
TOY = [*TINY_DATA, *TINY_MODEL, "data.channels=3", "model.pos_embed=learned", "optim.epochs=1",
       "optim.warmup_epochs=0.25", "optim.batch_size=32",
       "train.progress=false", "train.log_every=2", "train.ckpt_every=0", "eval.few_per_class=3",
       "eval.few_label_seeds=2",
       "eval.few_knn_k=3"]
DENSE = ("seg.scenes=128", "seg.val_scenes=16", "data.img_size=28")  # 7 x 7 patches of 4; 2 probe batches


@pytest.mark.slow
def test_demo_table_has_every_row_and_the_few_label_columns(tmp_path, capsys):
    md = run_demo(tmp_path, overrides=tuple(TOY), teacher=TEACHER, student=STUDENT, dense=DENSE)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["model"] for r in rows] == ["raw pixels", "random-init ViT", "MoCo v3 teacher", "MimCo student"]
    assert {"k-NN top-1", "linear probe top-1", "k-NN 3/class", "linear 3/class"} <= set(rows[0])
    for r in rows:
        mean, std = (float(v) for v in r["k-NN 3/class"].split(" ± "))
        assert 0 <= mean <= 100 and std >= 0
    for r in rows:  # the dense column: the segmentation probe on 28-px Fashion-MNIST scenes, 3 heads
        mean, std = (float(v) for v in r["scenes mIoU (28px)"].split(" ± "))
        assert 0 < mean <= 100 and std >= 0 and 0 <= float(r["token position acc."]) <= 100
    assert "procedural test top-1" in md and "the frozen segmentation probe on 16 validation scenes of 28 x 28" in md
    assert "token position acc.: a linear probe of each patch token's grid position" in md
    for png in ("tsne.png", "curves.png", "attention.png", "pca.png"):
        assert (tmp_path / png).stat().st_size > 5_000
    capsys.readouterr()
    run_demo(tmp_path, overrides=tuple(TOY), teacher=TEACHER, student=STUDENT, dense=DENSE)
    assert capsys.readouterr().err.count("reusing the finished run") == 2
