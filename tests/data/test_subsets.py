import pytest
import torch

from mimco.data.build import ImageArray
from mimco.data.files import FileImages
from mimco.data.subsets import balanced_subset, labelled_subset, labels_of, take
from mimco.errors import MimcoError

LABELS = torch.tensor([0] * 10 + [1] * 7 + [2] * 12)[torch.randperm(29, generator=torch.Generator().manual_seed(1))]


def test_balanced_seeded_and_ascending():
    idx = balanced_subset(LABELS, per_class=5, seed=0)
    assert torch.equal(torch.bincount(LABELS[idx]), torch.tensor([5, 5, 5]))
    assert torch.equal(idx, idx.unique())  # ascending, no repeats
    assert torch.equal(idx, balanced_subset(LABELS, per_class=5, seed=0))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(idx, balanced_subset(LABELS, per_class=5, seed=0))
    assert not torch.equal(idx, balanced_subset(LABELS, per_class=5, seed=1))
    full = balanced_subset(LABELS, per_class=7)  # the smallest class, whole
    assert set(full[LABELS[full] == 1].tolist()) == set((LABELS == 1).nonzero().flatten().tolist())


def test_fraction_of_each_class():
    idx = balanced_subset(LABELS, fraction=0.5, seed=3)
    assert torch.bincount(LABELS[idx]).tolist() == [5, 4, 6]  # round(0.5 * 10, 7, 12)
    assert torch.bincount(LABELS[balanced_subset(LABELS, fraction=0.01)]).tolist() == [1, 1, 1]  # at least one


@pytest.mark.parametrize("kw,message", [
    ({"per_class": 8}, r"--per-class=8 exceeds the smallest class \(class 1 has 7 images\); use at most 7"),
    ({"per_class": 0}, "must be at least 1"),
    ({"fraction": 1.5}, "not a fraction"),
])
def test_bad_sizes_are_named(kw, message):
    with pytest.raises(MimcoError, match=message):
        balanced_subset(LABELS, **kw)


def test_unlabelled_split_is_refused():
    with pytest.raises(MimcoError, match="needs a labelled training split"):
        balanced_subset(torch.full((5,), -1), per_class=1, what="data.labels_per_class")


def test_take_keeps_the_kind_and_reads_no_file(tmp_path):
    arr = ImageArray(torch.arange(29, dtype=torch.uint8).view(29, 1, 1, 1).expand(29, 1, 2, 2).clone(), LABELS, 1)
    sub = labelled_subset(arr, per_class=2, seed=4)
    idx = balanced_subset(LABELS, per_class=2, seed=4)
    assert isinstance(sub,
                      ImageArray) and torch.equal(sub.images[:, 0, 0, 0].long(),
                                                  idx) and torch.equal(sub.labels, LABELS[idx])
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(b"not read")
    files = FileImages(str(tmp_path), labelled=True)
    part = take(files, torch.tensor([0, 4]))
    assert part.items == [files.items[0], files.items[4]] and len(files) == 6
    assert labels_of(part).tolist() == [0, 1]
