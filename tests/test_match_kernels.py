"""The compiled CPU loops of the `dift` matcher (`match/kernels.py`) compute what torch computes:
the first maximum of the upsampled, scaled score map, the Gram maps and norms behind |t_p|, the
upsampled source vectors; and the CPU pair loop batches pairs by target through them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf_pipeline.match import kernels
from ditf_pipeline.match.dift import DiftMatcher
from ditf_pipeline.match.taps import linear_taps, upsampled_norms, upsampled_vectors


#  (grid h, w), (image height, width): SPair-like, odd, downsampled, one cell, identity
SHAPES = [((30, 40), (375, 500)), ((40, 30), (500, 375)), ((7, 5), (20, 31)), ((10, 10), (6, 4)),
          ((1, 4), (5, 7)), ((6, 8), (6, 8)), ((3, 1), (9, 2))]


def torch_argmax(dots: torch.Tensor, inverse_norm: torch.Tensor) -> np.ndarray:
    """What the materialised path computes: torch's upsampling, the scale, torch.argmax."""
    height, width = inverse_norm.shape
    up = F.interpolate(dots[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return torch.argmax(up.reshape(len(dots), -1) * inverse_norm.reshape(1, -1), dim=1).numpy()


def compiled_argmax(dots: torch.Tensor, inverse_norm: torch.Tensor) -> np.ndarray:
    (h, w), (height, width) = dots.shape[1:], inverse_norm.shape
    return kernels.upsampled_argmax(dots.numpy(), linear_taps(h, height), linear_taps(w, width), inverse_norm.numpy())


def test_numba_is_here():
    """A dependency: without it the CPU path silently takes torch's slower kernels."""
    assert kernels.available()


@pytest.mark.parametrize(("grid", "size"), SHAPES)
def test_the_compiled_argmax_is_torchs_pick(grid, size):
    g = torch.Generator().manual_seed(sum(grid) + sum(size))
    dots = torch.randn(12, *grid, generator=g)
    inverse_norm = torch.rand(*size, generator=g) + 0.5
    assert compiled_argmax(dots, inverse_norm).tolist() == torch_argmax(dots, inverse_norm).tolist()


@pytest.mark.parametrize(("grid", "size"), SHAPES[:3])
def test_the_compiled_argmax_breaks_rounding_ties_as_torch(grid, size):
    """Maps flat to within an ulp or two: which pixel holds the maximum is decided by the
    last bit of each upsampled score, so the kernel must round as torch's kernel does, fused
    multiply-adds included (without them ~30 % of the bits, and most of these picks, differ)."""
    g = torch.Generator().manual_seed(7 + sum(size))
    level = torch.rand(48, 1, 1, generator=g) + 0.5
    dots = level * (1 + 2e-7 * torch.randn(48, *grid, generator=g))
    inverse_norm = torch.ones(*size)
    assert compiled_argmax(dots, inverse_norm).tolist() == torch_argmax(dots, inverse_norm).tolist()


def test_the_compiled_argmax_keeps_the_first_maximum_and_nan_rules():
    dots = torch.zeros(5, 4, 4)
    dots[1, 2, 2] = float("nan")  # a NaN is the maximum (torch.argmax), the first one wins
    dots[2] = 1.0  # every pixel ties: pixel 0
    dots[3, 3, 3] = float("inf")
    dots[4] = -float("inf")  # nothing beats -inf: torch picks pixel 0
    inverse_norm = torch.ones(9, 9)
    assert compiled_argmax(dots, inverse_norm).tolist() == torch_argmax(dots, inverse_norm).tolist()
    assert compiled_argmax(dots, inverse_norm)[2] == 0


def test_the_gram_maps_and_norms_are_torchs_to_float32_rounding(monkeypatch):
    g = torch.Generator().manual_seed(5)
    grid = torch.randn(9, 7, 64, generator=g)
    top, bottom = grid[:-1], grid[1:]
    expected = [torch.linalg.vecdot(grid, grid), torch.linalg.vecdot(grid[:, :-1], grid[:, 1:]),
                torch.linalg.vecdot(top, bottom), torch.linalg.vecdot(top[:, :-1], bottom[:, 1:]),
                torch.linalg.vecdot(top[:, 1:], bottom[:, :-1])]
    for got, want in zip(kernels.neighbour_grams(grid.numpy()), expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)
    for grid_shape, size in [((9, 7), (40, 33)), ((1, 5), (8, 9)), ((4, 1), (7, 3))]:
        grid = torch.randn(*grid_shape, 32, generator=g)
        compiled = upsampled_norms(grid, size[::-1])
        monkeypatch.setattr(kernels, "available", lambda: False)
        torch_norms = upsampled_norms(grid, size[::-1])
        monkeypatch.undo()
        torch.testing.assert_close(compiled, torch_norms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_the_compiled_source_vectors_are_torchs_bits(monkeypatch, dtype):
    g = torch.Generator().manual_seed(9)
    grid = torch.randn(30, 40, 48, generator=g).half()
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, 500, 15), rng.integers(0, 375, 15)
    compiled = upsampled_vectors(grid, (500, 375), xs, ys, dtype)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(compiled, upsampled_vectors(grid, (500, 375), xs, ys, dtype))


def test_a_batch_of_sources_picks_what_each_source_picks_alone():
    """The CPU pair loop sends the pairs of one target through `best_batch` together."""
    g = torch.Generator().manual_seed(2)
    trg = torch.randn(30, 40, 64, generator=g).half()
    rng = np.random.default_rng(2)
    sources = [(torch.randn(40, 30, 64, generator=g).half(), (375, 500),
                np.stack([rng.integers(0, 375, n), rng.integers(0, 500, n)], 1)) for n in (3, 7, 1, 12)]
    matcher = DiftMatcher()
    batched = matcher.match_batch(trg, (500, 375), sources, trg_key="t")
    alone = [DiftMatcher().match(src, size, trg, (500, 375), kps) for src, size, kps in sources]
    for a, b in zip(batched, alone):
        np.testing.assert_array_equal(a, b)


def test_the_cpu_pair_loop_batches_by_target():
    from ditf_pipeline.datasets.base import Pair
    from ditf_pipeline.match.predict import match_pairs

    g = torch.Generator().manual_seed(4)
    maps = {key: torch.randn(6, 8, 16, generator=g).half() for key in "abc"}
    kps = np.array([[3.0, 4.0], [10.0, 2.0]])
    pairs = [Pair(f"{i}", "c", src, trg, kps, kps, (64, 48), (64, 48), 10.0)
             for i, (src, trg) in enumerate(["ab", "cb", "ac", "bc", "ca"])]

    class Counting(DiftMatcher):
        batches = 0

        def best_batch(self, *args, **kwargs):
            Counting.batches += 1
            return super().best_batch(*args, **kwargs)

    matcher = Counting()
    out = match_pairs(pairs, lambda s, t: (maps[s], maps[t], t), matcher, batch_by_target=True)
    assert Counting.batches == 3  # targets b, c and a
    for pair, got in zip(pairs, out):
        np.testing.assert_array_equal(got, DiftMatcher().match(maps[pair.src_key], (64, 48), maps[pair.trg_key], (64, 48), kps))
