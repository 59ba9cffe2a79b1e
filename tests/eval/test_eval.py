import pytest
import torch

from mimco.eval import knn_accuracy, linear_probe


def separable(n: int, c: int = 4, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 5
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g) * 0.5, y


def test_knn_separable_and_shuffled():
    x, y = separable(600)
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=20) > 98
    shuffled = y[:400][torch.randperm(400)]
    assert knn_accuracy(x[:400], shuffled, x[400:], y[400:], k=20) < 45


def test_linear_probe_separable_and_shuffled():
    x, y = separable(600)
    assert linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=20, batch_size=128) > 98
    shuffled = y[:400][torch.randperm(400)]
    assert linear_probe(x[:400], shuffled, x[400:], y[400:], epochs=20, batch_size=128) < 45


def test_mimco_eval_takes_its_settings_from_the_eval_config(tmp_path, capsys):
    """``mimco eval`` (the protocols knn and linear): k-NN with the config's k, temperature and bank
    cap, and the linear probe with the run's seed, as computed by hand."""
    import json

    from mimco.cli.main import main
    from mimco.config import PretrainConfig, apply_overrides
    from mimco.data.build import ImageArray, load_dataset
    from mimco.eval import extract_features

    device = torch.device("cpu")
    data = ["data.name=procedural", "data.img_size=8", "data.channels=1", "data.procedural_size=200"]
    for over in (["eval.knn_k=1", "eval.knn_temperature=0.5"], ["eval.knn_k=15", "eval.max_train=50"]):
        assert main(["eval", "pixels", *data, *over, "--no-linear", "--out", str(tmp_path)]) == 0
        got = json.loads(capsys.readouterr().out)
        cfg = apply_overrides(PretrainConfig(), [*data, *over], model_keys=False)
        train, test = load_dataset(cfg.data, True), load_dataset(cfg.data, False)
        ev = cfg.eval
        bank = ImageArray(train.images[: ev.max_train or None], train.labels[: ev.max_train or None], 1)
        ftr, ytr = extract_features(None, bank, cfg.data, device)
        fte, yte = extract_features(None, test, cfg.data, device)
        assert got["knn_top1"] == round(knn_accuracy(ftr, ytr, fte, yte, ev.knn_k, ev.knn_temperature), 2)
        assert "linear_top1" not in got
    assert main(["eval", "pixels", *data, "train.seed=3", "--out", str(tmp_path)]) == 0
    both = json.loads(capsys.readouterr().out)
    ftr, ytr = extract_features(None, train, cfg.data, device)
    assert both["linear_top1"] == round(linear_probe(ftr, ytr, fte, yte, seed=3), 2)


def test_attention_picture_takes_a_batch_on_the_gpu(tmp_path):
    """``mimco plot attention`` on CUDA: the batch and the maps live on the device (a stand-in here);
    display images come back to the host before any NumPy, and no host tensor meets a device one."""
    from mimco.config import ModelConfig
    from mimco.eval.plots import attention_figure, denormalize
    from mimco.models import create_vit
    from tests.fake_device import module_on_device, on_device

    model = module_on_device(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16))
    x = on_device(torch.randn(3, 3, 16, 16))
    with pytest.raises(RuntimeError, match="same device"):  # what the command did before
        x * torch.tensor([0.5, 0.5, 0.5]).view(1, -1, 1, 1)
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    shown = denormalize(x, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert type(shown) is torch.Tensor and torch.allclose(shown,
                                                          x.cpu() * 0.2 + torch.tensor([0.5, 0.4, 0.3]).view(1, -1, 1,
                                                                                                             1))
    out = attention_figure([("vit", model)], x, shown, tmp_path / "a.png")
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.parametrize("kind", ["array", "files"])
def test_distributed_extraction_covers_the_split_once(tmp_path, monkeypatch, kind):
    """The end-of-run features on (simulated) 2 processes: each extracts every 2nd image of a split
    of 7 (one padded slot), with the same number of forward passes; after the gather rank 0 holds
    each readable image's features once (an unreadable file dropped), in the split's order, as one
    process does."""
    from PIL import Image

    from mimco import distributed as dist
    from mimco.config import DataConfig, ModelConfig
    from mimco.data.build import ImageArray
    from mimco.data.files import FileImages
    from mimco.eval import extract_features
    from mimco.eval.features import extract_features_distributed
    from mimco.models import create_vit

    g = torch.Generator().manual_seed(0)
    images, labels = (torch.rand(7, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.arange(7) % 3
    data = DataConfig(name="procedural", img_size=16, num_workers=0)
    if kind == "array":
        split = ImageArray(images, labels, 3)
    else:
        for i in range(7):
            (tmp_path / f"c{int(labels[i])}").mkdir(exist_ok=True)
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"c{int(labels[i])}" / f"{i}.png")
        (tmp_path / "c1" / "4.png").write_bytes(b"")  # unreadable
        split = FileImages(str(tmp_path), labelled=True)
    model = create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16).eval()
    device = torch.device("cpu")
    want_f, want_y = extract_features(model, split, data, device)
    forwards, parts = {0: 0, 1: 0}, {}
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for r in (1, 0):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "is_main", lambda r=r: r == 0)
        calls = iter(range(100))  # per batch: features, labels, indices, readable

        def gather(x, r=r, calls=calls):  # to the main process only: rank 1 gets nothing back
            i = next(calls)
            parts[(r, i)] = x
            return None if r == 1 else [x, parts[(1, i)]]

        monkeypatch.setattr(dist, "gather_to_main", gather)
        hook = model.blocks[0].register_forward_hook(lambda *a, r=r: forwards.__setitem__(r, forwards[r] + 1))
        out = extract_features_distributed(model, split, data, device, batch_size=2)
        hook.remove()
        assert (out is None) == (r == 1)
    assert forwards[0] == forwards[1] == 2  # 4 slots each (one padded), batches of 2
    got_f, got_y = out
    assert len(got_f) == len(want_f) == (7 if kind == "array" else 6)
    assert torch.allclose(got_f, want_f, atol=1e-5)  # back in the split's order
    assert torch.equal(got_y, want_y)


def test_the_end_of_run_bank_is_capped_for_an_image_folder_too(tmp_path):
    """``eval.max_train`` cuts an image folder's bank as an in-memory one's: a fixed sample (the same
    every time), in the folder's order, drawn from every class (a folder lists its files class by
    class, so its first images would be one class)."""
    from PIL import Image

    from mimco.config import EvalConfig
    from mimco.data.files import FileImages
    from mimco.eval.probe import bank_split

    for c in range(4):
        (tmp_path / f"c{c}").mkdir()
        for i in range(10):
            Image.new("RGB", (4, 4)).save(tmp_path / f"c{c}" / f"{i}.png")
    folder = FileImages(str(tmp_path), labelled=True)
    bank = bank_split(folder, EvalConfig(max_train=12))
    assert len(bank) == 12 and len(folder) == 40
    assert bank.items == bank_split(folder, EvalConfig(max_train=12)).items
    order = [folder.items.index(item) for item in bank.items]
    assert order == sorted(order) and len({label for _, label in bank.items}) > 1
    assert all(bank_split(folder, EvalConfig(max_train=m)) is folder for m in (0, 40))
