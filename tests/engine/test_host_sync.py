"""The class of slowdown only a GPU shows: a host-device synchronisation inside the training step
(``.item()``, ``bool(tensor)``, a blocking copy of a host value to the device, an op whose output
size depends on the data). Each method's forward runs on the meta device, a stand-in for CUDA,
under a dispatch mode that records every such call."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mimco.config import FinetuneConfig, ModelConfig
from mimco.eval.finetune import Finetune, build_classifier
from mimco.models import create_vit
from tests.helpers import registered, registered_names

aten = torch.ops.aten
TINY = ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2)
#: ops whose output size depends on the data: the host waits for the device to know it
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                  aten._unique2.default}


class HostSyncs(TorchDispatchMode):
    """Records ``.item()`` and its kin, blocking host-to-device copies (a host index into a device
    tensor among them) and data-dependent shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.found.append("a tensor read on the host (.item(), float(), bool())")
        elif func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            if src.device.type == "cpu" and dst is not None and torch.device(dst).type != "cpu" \
                    and not kwargs.get("non_blocking", False):
                self.found.append(f"a blocking copy of a host tensor {tuple(src.shape)} to {dst}")
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if src.device.type == "cpu" and dst.device.type != "cpu" and blocking:
                self.found.append(f"a blocking copy of a host tensor {tuple(src.shape)} into the device")
        elif func in DATA_DEPENDENT:
            self.found.append(f"{func} (its output size depends on the data)")
        elif func is aten.index.Tensor and args[0].device.type != "cpu" and any(
                i is not None and i.device.type == "cpu" and i.dim() > 0 for i in args[1]):
            self.found.append(f"a host index into a device tensor {tuple(args[0].shape)} (copied to it, blocking)")
        return func(*args, **kwargs)


class HostData(TorchFunctionMode):
    """Records tensors made on a device from Python data (``torch.tensor(x, device=...)``,
    ``t.new_tensor(x)``, ``torch.as_tensor(list, device=...)``): each is a host-to-device copy from
    pageable memory, which waits for the device. Built before the dispatcher, so seen here."""

    MAKERS = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor",
              torch.Tensor.new_tensor: "Tensor.new_tensor"}

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MAKERS:
            if func is torch.Tensor.new_tensor:
                data, dev = args[1], kwargs.get("device", args[0].device)
            else:
                data, dev = args[0], kwargs.get("device")
            if dev is not None and torch.device(dev).type != "cpu" and not isinstance(data, torch.Tensor):
                self.found.append(f"{self.MAKERS[func]} of host data {data!r:.40} on {dev}")
        return func(*args, **kwargs)


class host_syncs:
    """``with host_syncs() as found``: both recorders at once; ``found`` lists what they saw."""

    def __enter__(self) -> list[str]:
        self.dispatch = HostSyncs()
        self.function = HostData(self.dispatch.found)
        self.dispatch.__enter__()
        self.function.__enter__()
        return self.dispatch.found

    def __exit__(self, *exc) -> None:
        self.function.__exit__(*exc)
        self.dispatch.__exit__(*exc)


def _finetune(tmp_path) -> Finetune:
    cfg = FinetuneConfig()
    cfg.aug.mixup, cfg.aug.cutmix = 0.8, 1.0
    return Finetune(build_classifier(create_vit(TINY, 16), 10, "avg", 0.1), cfg, 10, None, tmp_path)


#: every registered method as its stage builds it, and MimCo's loss variants; (build, views)
METHODS = {
    **{f"{stage}: {name}": (lambda ckpt, s=stage, n=name: registered(s, n, ckpt), 2 if stage == "teacher" else 1)
       for stage, name in registered_names()},
    "mimco, batch negatives capped, threshold": (lambda ckpt: registered("pretrain", "mimco", ckpt, (
        "loss.patch_negatives=batch", "loss.patch_max_negatives=8", "loss.patch_neg_threshold=0.9")), 1),
    "mimco, image negatives, threshold": (lambda ckpt: registered("pretrain", "mimco", ckpt, (
        "loss.patch_neg_threshold=0.9",)), 1),
    "mimco, smooth_l1 patch loss": (lambda ckpt: registered("pretrain", "mimco", ckpt,
                                                            ("loss.patch_loss=smooth_l1",)), 1),
    "simmim, block masks": (lambda ckpt: registered("pretrain", "simmim", ckpt, ("mask.type=block",)), 1),
}


@pytest.mark.parametrize("name", [*METHODS, "finetune, mixup/cutmix"])
def test_a_training_step_never_waits_for_the_device(name, tmp_path, teacher_ckpt):
    build, n_views = METHODS.get(name, (None, 2))
    method = build(teacher_ckpt) if build is not None else _finetune(tmp_path)
    method.total_steps = 10
    method = method.to("meta").train()
    views = [torch.empty(4, 3, 16, 16, device="meta") for _ in range(n_views)]
    if name.startswith("finetune"):
        views[1] = torch.zeros(4, dtype=torch.long, device="meta")
    with host_syncs() as found:
        loss, logs = method(views, 3, 0)
        loss.backward()
        method.after_step(4)  # the hook after the optimiser step is part of the step too (MoCo's EMA)
    assert loss.device.type == "meta"
    assert found == [], f"{name}: {found}"


def test_the_recorders_see_each_kind_of_sync():
    """The recorders themselves: each pattern they must catch, on the meta device."""
    x = torch.ones(3, device="meta")
    with host_syncs() as found:
        x.new_tensor(0.99)  # a Python float sent to the device: the MoCo momentum log did this
        torch.tensor([0.5, 0.2], device="meta")
        torch.ones(2).to("meta")
        torch.ones(2).to("meta", non_blocking=True)  # allowed: asynchronous (pinned on a GPU)
        torch.empty(2, device="meta").copy_(torch.ones(2))
        torch.full((), 0.5, device="meta")  # allowed: a fill kernel, no copy
        x[torch.tensor([0, 2])]  # a host index: the device copies it before indexing
        x[torch.arange(0, 3, 2, device="meta")]  # allowed: the index already there
        with pytest.raises(NotImplementedError):  # meta cannot say how many; the recorder notes the call first
            x.nonzero()
        with pytest.raises(Exception):  # noqa: B017  (meta tensors cannot be read at all, by any exception; likewise)
            x.sum().item()
    assert len(found) == 7, found
    assert found[0].startswith("Tensor.new_tensor") and found[-1].startswith("a tensor read on the host")


@pytest.mark.parametrize("views, channels", [("two", 3), ("two", 1), ("one", 3)])
def test_the_batched_views_of_in_memory_images_never_wait_for_the_device(views, channels):
    """``data.on_device``: the batched augmentation draws its random parameters on the device (none
    made on the host and copied there), and the stream indexes the device's images with an index
    already there; over an epoch's end too."""
    from mimco.config import ContrastiveAugConfig, DataConfig, MimAugConfig
    from mimco.data.build import BatchStream, ImageArray
    from mimco.data.transforms import BatchMimView, BatchTwoViews

    data = DataConfig(img_size=16, channels=channels)
    tf = BatchTwoViews(ContrastiveAugConfig(), data) if views == "two" else BatchMimView(MimAugConfig(), data)
    images = torch.empty(12, channels, 16, 16, dtype=torch.uint8, device="meta")
    stream = BatchStream(ImageArray(images, torch.zeros(12, dtype=torch.long), channels), 4, 0,
                         torch.device("meta"), tf.to("meta"), 0)
    batches = stream(0)
    with host_syncs() as found:
        got = [next(batches) for _ in range(4)]  # 3 steps an epoch
    assert [tuple(v.shape) for v in got[-1]] == [(4, channels, 16, 16)] * (2 if views == "two" else 1)
    assert all(v.device.type == "meta" for b in got for v in b)
    assert found == [], found
