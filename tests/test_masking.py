import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimco.masking import (
    MaskGenerator,
    block_mask,
    join_pending,
    masked_indices,
    num_masked,
    random_mask,
    sample_blocks,
    seeded_random_mask,
)
from tests.helpers import HANG


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75])
def test_random_mask_exact_ratio_and_shape(ratio):
    m = random_mask(8, (4, 4), ratio, generator=torch.Generator().manual_seed(0))
    assert m.shape == (8, 16) and m.dtype == torch.bool
    assert (m.sum(1) == round(16 * ratio)).all()


def test_random_mask_units_are_square_blocks():
    m = random_mask(4, (8, 8), 0.5, mask_unit=2, generator=torch.Generator().manual_seed(1)).view(4, 8, 8)
    assert (m.sum((1, 2)) == 32).all()
    cells = m.view(4, 4, 2, 4, 2)
    assert (cells.all(dim=(2, 4)) == cells.any(dim=(2, 4))).all()  # every 2x2 unit all-or-nothing


def test_random_mask_seeded():
    a = random_mask(4, (4, 4), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_mask(4, (4, 4), 0.6, generator=torch.Generator().manual_seed(3))
    c = random_mask(4, (4, 4), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_mask_exact_and_seeded():
    a = block_mask(16, (14, 14), 0.4, seed=0)
    assert a.shape == (16, 196) and (a.sum(1) == num_masked(196, 0.4)).all()
    assert torch.equal(a, block_mask(16, (14, 14), 0.4, seed=0))
    assert not torch.equal(a, block_mask(16, (14, 14), 0.4, seed=1))
    small = block_mask(8, (4, 4), 0.6, seed=0)
    assert (small.sum(1) == 10).all()


def test_blocks_within_area_and_aspect_bounds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask, blocks = sample_blocks((14, 14), 78, rng, min_patches=4, min_aspect=0.3)
        assert blocks
        for top, left, h, w in blocks:
            assert h * w >= 4 and 0.3 <= h / w <= 1 / 0.3
            assert top + h <= 14 and left + w <= 14
            assert mask[top : top + h, left : left + w].all()


def test_generator_depends_on_step_and_slice_only():
    for kind in ("random", "block"):
        g = MaskGenerator(kind, 0.6, (4, 4), seed=7)
        assert torch.equal(g(4, step=5), g(4, step=5))
        assert not torch.equal(g(4, step=5), g(4, step=6))
        full = g(8, step=5)  # one process, global batch 8 == two processes of 4 == 4 micro-batches of 2
        assert torch.equal(g(4, step=5, first_index=0), full[:4])
        assert torch.equal(g(4, step=5, first_index=4), full[4:])
        for i in range(4):
            assert torch.equal(g(2, step=5, first_index=2 * i), full[2 * i : 2 * i + 2])
        assert not torch.equal(full[:2], full[2:4])  # micro-batches do not share one mask
    with pytest.raises(ValueError):
        MaskGenerator("random", 1.0, (4, 4))


def test_prefetched_masks_equal_built_ones():
    """The background thread builds step s+1 while step s trains; what it hands over is what
    building on demand gives, also when the steps asked for jump (a resume)."""
    for kind in ("random", "block"):
        ahead = MaskGenerator(kind, 0.6, (8, 8), seed=3)
        plain = MaskGenerator(kind, 0.6, (8, 8), seed=3, prefetch=False)
        for step in (0, 1, 2, 7, 8):
            assert torch.equal(ahead(6, step, first_index=6), plain(6, step, first_index=6))
        assert (6, 9, 6) in ahead._ahead  # the next step is under way


_EXIT_SCRIPT = """
import sys, time
from pathlib import Path
from mimco.masking import MaskGenerator

class Slow(MaskGenerator):
    def build(self, batch_size, step, first_index=0):
        if step > 0:  # the prefetch of the step after the last: still running when the script ends
            time.sleep(0.5)
            Path(sys.argv[1]).write_text("built")
        return super().build(batch_size, step, first_index)

Slow("random", 0.6, (4, 4))(8, 0)
"""


@pytest.mark.slow
def test_no_mask_thread_is_left_running_at_exit(tmp_path):
    """A process that ends while the next step's masks are being built waits for them: a daemon
    thread inside torch at interpreter exit aborts the process ("terminate called without an
    active exception", exit -6), which under torchrun fails the whole job after a good run."""
    marker = tmp_path / "built"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(marker)], capture_output=True, text=True, env=env,
                       timeout=HANG)
    assert r.returncode == 0, r.stderr
    assert marker.read_text() == "built"  # the build ran to its end before the process left


def test_masked_indices_match_nonzero_and_count():
    for kind, unit in (("random", 1), ("random", 2), ("block", 1)):
        g = MaskGenerator(kind, 0.6, (8, 8), mask_unit=unit, seed=1)
        m = g(5, step=2)
        assert (m.sum(1) == g.count).all()
        assert torch.equal(masked_indices(m, g.count), m.nonzero()[:, 1].view(5, -1))


def test_the_prefetched_build_is_used_not_redone(monkeypatch):
    """Step s + 1 is built once, in the background, while step s is handed out; asking for it
    takes that build (a mask for the wrong step, or a second build, fails)."""
    calls = []
    real = MaskGenerator.build

    def counting(self, batch_size, step, first_index=0):
        calls.append(step)
        return real(self, batch_size, step, first_index)

    monkeypatch.setattr(MaskGenerator, "build", counting)
    gen = MaskGenerator("random", 0.5, (4, 4), seed=1)
    first = gen(3, 0)
    second = gen(3, 1)
    join_pending()
    assert sorted(calls) == [0, 1, 2]  # 0 on demand; 1 and 2 ahead
    plain = MaskGenerator("random", 0.5, (4, 4), seed=1, prefetch=False)
    assert torch.equal(first, plain(3, 0)) and torch.equal(second, plain(3, 1))


@pytest.mark.parametrize("prefetch", [True, False])
def test_masks_for_a_gpu_are_built_pinned_and_copied_without_waiting(monkeypatch, prefetch):
    """A GPU's masks (built and prefetched here, on the host) are page-locked before their
    non-blocking copy: from pageable memory the copy would wait for the device every step.
    pin_memory and the copy are recorded by stand-ins (there is no GPU here)."""
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(tuple(self.shape)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or self)
    gen = MaskGenerator("block", 0.5, (4, 4), seed=1, prefetch=prefetch)
    gen(3, 0, device="cuda")
    gen(3, 1, device="cuda")
    join_pending()
    assert pinned == [(3, 16)] * (3 if prefetch else 2)  # steps 0, 1 (and 2 ahead)
    assert copies == [(("cuda",), {"non_blocking": True})] * 2
    pinned.clear()
    gen(3, 2, device="cpu")
    join_pending()
    assert pinned == []  # nothing to pin for the CPU


def test_masks_come_on_the_device_asked_for():
    gen = MaskGenerator("random", 0.5, (4, 4), seed=1)
    assert gen(2, 0).device.type == "cpu" and gen(2, 1, device="meta").device.type == "meta"


def _reference_blocks(h, w, target, rng, min_patches, min_aspect, attempts=10):
    """BEiT's blockwise masking as the docstring states it, written apart (same draws in the same order)."""
    mask = [[False] * w for _ in range(h)]
    count = lambda: sum(map(sum, mask))  # noqa: E731
    lo, hi = math.log(min_aspect), -math.log(min_aspect)
    while count() < target:
        left_to_mask, placed = target - count(), False
        for _ in range(attempts):
            area = rng.uniform(min_patches, max(min_patches, left_to_mask))
            ar = math.exp(rng.uniform(lo, hi))
            bh, bw = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            too_thin = not min_aspect <= bh / bw <= 1 / min_aspect
            if bh < 1 or bw < 1 or bh > h or bw > w or bh * bw < min_patches or too_thin:
                continue
            t, l = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            fresh = sum(not mask[i][j] for i in range(t, t + bh) for j in range(l, l + bw))
            if 1 <= fresh <= left_to_mask:
                for i in range(t, t + bh):
                    for j in range(l, l + bw):
                        mask[i][j] = True
                placed = True
                break
        if not placed:
            free = [i * w + j for i in range(h) for j in range(w) if not mask[i][j]]
            for k in rng.choice(free, size=left_to_mask, replace=False):
                mask[k // w][k % w] = True
    return np.array(mask)


@pytest.mark.parametrize("grid, target, min_patches, min_aspect", [
    ((14, 14), 78, 4, 0.3), ((8, 8), 38, 4, 0.3), ((14, 7), 40, 16, 0.3), ((3, 3), 7, 4, 0.3), ((6, 6), 20, 4, 0.5),
    ((6, 6), 20, 1, 0.3)])  # min_patches=1: blocks one patch wide
def test_blocks_equal_an_independent_reference(grid, target, min_patches, min_aspect):
    for seed in range(20):
        got, _ = sample_blocks(grid, target, np.random.default_rng(seed), min_patches, min_aspect)
        want = _reference_blocks(*grid, target, np.random.default_rng(seed), min_patches, min_aspect)
        assert got.dtype == bool and got.sum() == target and np.array_equal(got, want), (grid, seed)


def test_block_defaults_are_beits():
    a, _ = sample_blocks((14, 14), 78, np.random.default_rng(5))
    b, _ = sample_blocks((14, 14), 78, np.random.default_rng(5), min_patches=4, min_aspect=0.3, max_attempts=10)
    assert np.array_equal(a, b)


def test_blocks_are_both_tall_and_wide():
    rng = np.random.default_rng(0)
    shapes = [h / w for _ in range(30) for _, _, h, w in sample_blocks((14, 14), 78, rng)[1]]
    assert min(shapes) < 0.7 and max(shapes) > 1.4  # aspect drawn on [0.3, 1/0.3], log-uniform


def test_num_masked_bounds_and_message():
    assert num_masked(10, 0.01) == 1 and num_masked(10, 0.99) == 9 and num_masked(196, 0.6) == 118
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"mask ratio must be in \(0, 1\), got {bad}"):
            num_masked(10, bad)


def test_masks_on_a_rectangular_grid_and_the_unit_check():
    m = random_mask(2, (4, 6), 0.5, mask_unit=2)
    assert m.shape == (2, 24) and (m.sum(1) == 12).all()
    with pytest.raises(ValueError, match="patch grid 4x6 is not divisible by the mask unit 4"):
        random_mask(2, (4, 6), 0.5, mask_unit=4)
    with pytest.raises(ValueError, match="unknown mask type 'grid'"):
        MaskGenerator("grid", 0.5, (4, 4))


def test_mask_functions_honour_the_device():
    for fn in (lambda d: random_mask(2, (4, 4), 0.5, device=d), lambda d: block_mask(2, (4, 4), 0.5, 0, device=d)):
        assert fn(None).device.type == "cpu" and fn("meta").device.type == "meta"


def test_block_settings_and_seeds_reach_the_sampler():
    """block_mask and the generator pass min_patches / min_aspect through, seed sample i with
    (seed, first_index + i), and the generator's seed for step s is seed * 1_000_003 + s."""
    got = block_mask(3, (8, 8), 0.5, 11, 9, 0.5, first_index=4)
    for i in range(3):
        want, _ = sample_blocks((8, 8), 32, np.random.default_rng([11, 4 + i]), 9, 0.5)
        assert np.array_equal(got[i].numpy(), want.ravel())
    gen = MaskGenerator("block", 0.5, (8, 8), min_patches=9, min_aspect=0.5, seed=2, prefetch=False)
    assert torch.equal(gen.build(3, 5, 4), block_mask(3, (8, 8), 0.5, 2 * 1_000_003 + 5, 9, 0.5, first_index=4))
    # defaults: BEiT's (4 patches, aspect 0.3), seed 0, first index 0, unit 1
    assert torch.equal(MaskGenerator("block", 0.5, (8, 8), prefetch=False).build(2, 3),
                       block_mask(2, (8, 8), 0.5, 3, 4, 0.3, first_index=0))
    assert torch.equal(block_mask(2, (8, 8), 0.5, 3), block_mask(2, (8, 8), 0.5, 3, 4, 0.3, first_index=0))
    assert torch.equal(seeded_random_mask(2, (8, 8), 0.5, 3), seeded_random_mask(2, (8, 8), 0.5, 3, 1, 0))
    assert torch.equal(MaskGenerator("random", 0.5, (8, 8), prefetch=False).build(2, 3),
                       seeded_random_mask(2, (8, 8), 0.5, 3, 1, 0))


def test_a_generator_with_masks_under_way_pickles():
    """Loader workers may pickle the generator; a build under way is not carried along."""
    import pickle

    gen = MaskGenerator("random", 0.5, (4, 4), seed=1)
    gen(2, 0)
    copy = pickle.loads(pickle.dumps(gen))
    assert copy._ahead == {} and torch.equal(copy(2, 1), gen(2, 1))


@pytest.mark.parametrize("kind, mask_patch_size, unit", [("random", 0, 1), ("random", 4, 1), ("random", 8, 2),
                                                          ("random", 16, 4), ("block", 0, 1), ("block", 2, 1)])
def test_from_config_takes_each_setting_of_the_mask_section(kind, mask_patch_size, unit):
    """The mask unit is mask_patch_size / patch_size patches (0: the patch size; never below 1); the
    other settings and the seed pass through as they are."""
    from mimco.config import MaskConfig

    cfg = MaskConfig(type=kind, ratio=0.4, mask_patch_size=mask_patch_size, min_block_patches=6, min_aspect=0.45)
    gen = MaskGenerator.from_config(cfg, 4, [8, 8], seed=13)
    assert (gen.kind, gen.ratio, gen.grid_size, gen.mask_unit) == (kind, 0.4, (8, 8), unit)
    assert (gen.min_patches, gen.min_aspect, gen.seed, gen.prefetch) == (6, 0.45, 13, True)
    assert isinstance(gen.grid_size, tuple) and type(gen.mask_unit) is int
    gen.prefetch = False
    plain = MaskGenerator(kind, 0.4, (8, 8), unit, 6, 0.45, 13, prefetch=False)
    assert torch.equal(gen(3, 2), plain(3, 2))


def test_block_masks_on_a_rectangular_grid():
    """The count is the ratio of all H x W patches (not H x H or W x W)."""
    for grid in ((4, 6), (6, 4)):
        m = block_mask(3, grid, 0.5, seed=0)
        assert m.shape == (3, 24) and (m.sum(1) == 12).all()
    gen = MaskGenerator("block", 0.5, (4, 8), seed=1, prefetch=False)
    assert gen.count == 16 and (gen(2, 0).sum(1) == 16).all()


def test_an_error_in_a_background_build_reaches_the_caller(monkeypatch):
    """A build that fails in the prefetch thread fails the call that takes it, with that error."""
    real = MaskGenerator.build

    def failing(self, batch_size, step, first_index=0):
        if step == 1:
            raise RuntimeError("no masks for step 1")
        return real(self, batch_size, step, first_index)

    monkeypatch.setattr(MaskGenerator, "build", failing)
    gen = MaskGenerator("random", 0.5, (4, 4), seed=1)
    gen(2, 0)  # step 1 is now built ahead, and fails there
    with pytest.raises(RuntimeError, match="^no masks for step 1$"):
        gen(2, 1)
    join_pending()
