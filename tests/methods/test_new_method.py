"""A method defined outside the package (examples/simsiam.py) trains through the same stage runner
as the built-in ones, loaded as a plugin by ``mimco`` itself (``--plugin``) with DDP on 2 processes
and train.compile, and from its own ``__main__`` with FSDP, then exports its backbone: the registry,
the method's own config section and the method contract are all the engine, runs.py and models/ need."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mimco.runs import load_checkpoint
from tests.helpers import ENV, HANG, ROOT, TINY_DATA, TINY_MODEL, TINY_RUN, TORCHRUN

SIMSIAM = str(ROOT / "examples" / "simsiam.py")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train(tmp_path, name, *extra, plugin=True):
    """Train SimSiam on 2 processes: ``mimco teacher --plugin examples/simsiam.py`` (or the file's own ``__main__``)."""
    args = ["teacher", "method=simsiam", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "simsiam.proj_dim=16",
            "simsiam.hidden_dim=32", "train.threads=1", "train.log_every=1", "optim.epochs=2",
            f"train.out_dir={tmp_path}", f"train.name={name}", *extra]
    if plugin:
        return _run([*TORCHRUN, "-m", "mimco", args[0], "--plugin", SIMSIAM, *args[1:]])
    return _run([*TORCHRUN, SIMSIAM, *args])


@pytest.mark.slow
def test_a_method_from_outside_trains_with_ddp_compile_and_fsdp_and_exports(tmp_path):
    ddp = _train(tmp_path, "ddp", "train.compile=true")
    # compile_targets(): 2 blocks + the patch embedding + the projector + the predictor
    assert "torch.compile of 5 blocks" in ddp.stderr
    _train(tmp_path, "fsdp", "train.strategy=fsdp", plugin=False)
    for name in ("ddp", "fsdp"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["step"] == summary["total_steps"] == 16 and "stopped_by" not in summary
        header = (tmp_path / name / "log.csv").read_text().splitlines()[0].split(",")
        assert {"loss", "z_std"} <= set(header)
    ckpt = load_checkpoint(tmp_path / "fsdp" / "last.pt")
    assert ckpt["backbones"] == {"backbone": "encoder."} and ckpt["config"]["method"] == "simsiam"
    assert ckpt["config"]["simsiam"] == {"proj_dim": 16, "hidden_dim": 32} and "moco" not in ckpt["config"]
    assert ckpt["model"]["predictor.0.weight"].shape == (32, 16)  # the section's widths built the predictor
    # whole fp32 weights under FSDP; the backbone found from the record alone, by export and by timm
    out = tmp_path / "export"
    _run([sys.executable, "-m", "mimco", "export", str(tmp_path / "fsdp" / "last.pt"), "--out", str(out)])
    exported = load_file(str(out / "model.safetensors"))
    want = {k[len("encoder."):]: v for k, v in ckpt["model"].items()
            if k.startswith("encoder.") and not k.startswith("encoder.head.")}
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # no timm model is 32 wide: model_args build it
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    assert model.embed_dim == 32 and len(model.blocks) == 2


@pytest.mark.slow
def test_an_unregistered_method_is_refused_before_any_data():
    r = subprocess.run([sys.executable, "-m", "mimco", "teacher", "method=simsiam", *TINY_DATA], capture_output=True,
                       text=True, env=ENV, timeout=HANG, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == ("mimco: error: unknown method 'simsiam'; choose mocov3 (a method "
                                                      "defined in a file of your own loads with --plugin FILE)")
