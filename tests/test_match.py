"""Matchers: the fast dift matcher against the naive reference, and the geoaware protocol."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.matchers import (
    DiftMatcher,
    GeoAwareMatcher,
    dift_reference_similarity,
    geoaware_frame,
    geoaware_threshold_scale,
    linear_taps,
    make_matcher,
    nearest_neighbours,
    upsampled_norms,
    window_soft_argmax,
)

NEAR_TIE = 1e-5


# --------------------------------------------------------------------------------------------
# dift: building blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_size, out_size", [(40, 500), (30, 375), (37, 501), (23, 333), (7, 13), (1, 9), (40, 30), (64, 64), (33, 1000)])
def test_linear_taps_are_pytorchs_bit_for_bit(in_size, out_size):
    eye = torch.eye(in_size).reshape(1, in_size, in_size, 1)
    expected = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False)[0, :, :, 0]
    taps = linear_taps(in_size, out_size)
    got = torch.zeros(in_size, out_size)
    cols = torch.arange(out_size)
    got.index_put_((taps.index0, cols), taps.weight0, accumulate=True)
    got.index_put_((taps.index1, cols), taps.weight1, accumulate=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("h, w, width, height", [(30, 40, 500, 375), (23, 37, 501, 333), (1, 5, 7, 9), (5, 1, 9, 7), (40, 30, 20, 30)])
def test_upsampled_norms_equal_the_materialised_map(h, w, width, height):
    grid = torch.randn(h, w, 96, generator=torch.Generator().manual_seed(h * w))
    expected = F.interpolate(grid.permute(2, 0, 1)[None], size=(height, width), mode="bilinear", align_corners=False)[0].norm(dim=0)
    torch.testing.assert_close(upsampled_norms(grid, (width, height)), expected, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# dift: fast matcher vs naive reference
# --------------------------------------------------------------------------------------------


def _pair(seed, src_grid, src_size, trg_grid, trg_size, channels, n_kps=20):
    """Random features where half of the keypoints have a planted (noisy) match in the target."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(*src_grid, channels, generator=g)
    trg = torch.randn(*trg_grid, channels, generator=g)
    rng = np.random.default_rng(seed)
    kps = np.stack([rng.integers(0, src_size[0], n_kps), rng.integers(0, src_size[1], n_kps)], 1)
    for x, y in kps[: n_kps // 2]:
        sy, sx = min(int(y * src_grid[0] / src_size[1]), src_grid[0] - 1), min(int(x * src_grid[1] / src_size[0]), src_grid[1] - 1)
        ty, tx = rng.integers(0, trg_grid[0]), rng.integers(0, trg_grid[1])
        trg[ty, tx] = src[sy, sx] + 0.5 * torch.randn(channels, generator=g)
    return src, trg, kps


def _compare(cases):
    """Predictions of the fast matcher vs the reference cosine maps; returns (n, mismatches)."""
    matcher = DiftMatcher()
    n = mismatches = 0
    for key, (src, src_size, trg, trg_size, kps) in enumerate(cases):
        fast = matcher.match(src, src_size, trg, trg_size, kps, trg_key=key)
        cosine = dift_reference_similarity(src, src_size, trg, trg_size, kps).reshape(len(kps), -1)
        reference_best = cosine.argmax(dim=1).numpy()
        width = trg_size[0]
        reference = np.stack([reference_best % width, reference_best // width], 1)
        for i in range(len(kps)):
            n += 1
            if not np.array_equal(fast[i], reference[i]):
                mismatches += 1
                at_fast = cosine[i, int(fast[i, 1]) * width + int(fast[i, 0])]
                # only a numerical near-tie may differ
                assert at_fast >= cosine[i].max() - NEAR_TIE, (key, i, fast[i], reference[i])
    return n, mismatches


@pytest.mark.slow
def test_fast_dift_equals_reference_at_spair_size():
    """40x30 grids, 500x375 and 375x500 images, 3072 channels (the Flux cache at 640 px)."""
    cases = []
    a = _pair(0, (30, 40), (500, 375), (40, 30), (375, 500), 3072)
    cases.append((a[0], (500, 375), a[1], (375, 500), a[2]))
    b = _pair(1, (40, 30), (375, 500), (30, 40), (500, 375), 3072)
    cases.append((b[0], (375, 500), b[1], (500, 375), b[2]))
    n, mismatches = _compare(cases)
    assert mismatches <= 0.001 * n


def test_fast_dift_equals_reference_odd_sizes():
    """Odd image sizes, grids that do not divide the image, a grid finer than the image."""
    cases = []
    for seed, (sg, ss, tg, ts) in enumerate(
        [
            ((23, 37), (501, 333), (37, 23), (333, 501)),  # nothing divides
            ((17, 29), (499, 281), (31, 19), (211, 387)),
            ((40, 30), (29, 41), (30, 40), (37, 23)),  # downsampling: grid larger than image
        ]
    ):
        src, trg, kps = _pair(10 + seed, sg, ss, tg, ts, 256, n_kps=40)
        cases.append((src, ss, trg, ts, kps))
    n, mismatches = _compare(cases)
    assert mismatches <= 0.001 * n


def test_one_cell_wide_grids_differ_only_by_near_ties():
    """A grid one cell wide makes every pixel of a row the same vector in exact arithmetic;
    which of these ties wins is decided by rounding (w0 * g + w1 * g), differently in the
    materialised map, so here only the near-tie criterion applies (asserted in `_compare`)."""
    src, trg, kps = _pair(13, (1, 9), (117, 13), (9, 1), (15, 121), 256, n_kps=40)
    n, _ = _compare([(src, (117, 13), trg, (15, 121), kps)])
    assert n == 40


def test_float16_cache_is_accepted_and_target_cache_reused():
    src, trg, kps = _pair(3, (12, 16), (160, 120), (12, 16), (160, 120), 64)
    matcher = DiftMatcher()
    first = matcher.match(src.half(), (160, 120), trg.half(), (160, 120), kps, trg_key="t")
    second = matcher.match(src.half(), (160, 120), trg.half(), (160, 120), kps, trg_key="t")
    np.testing.assert_array_equal(first, second)
    assert matcher._inverse_norms.hits == 1


def test_exact_ties_pick_the_first_maximum_in_row_major_order():
    """Integer features and a 4x upsampling make every product exact: true ties.

    The target holds two 2x2 blocks equal to the source vector: A at the top right, B at the
    bottom left. Every pixel whose four taps lie inside a block has cosine exactly 1. Row-major
    order must pick A's first pixel (x=22, y=6), column-major would pick B.
    """
    rng = np.random.default_rng(5)
    d, grid_h, grid_w = 16, 6, 8
    size = (4 * grid_w, 4 * grid_h)  # (32, 24): taps 1/8, 3/8, 5/8, 7/8 -- exact in binary
    star = torch.from_numpy(rng.integers(-4, 5, d)).float()
    src = star.expand(grid_h, grid_w, d).clone()
    trg = torch.from_numpy(rng.integers(-4, 5, (grid_h, grid_w, d))).float()
    trg[1:3, 5:7] = star  # block A
    trg[3:5, 0:2] = star  # block B
    kps = np.array([[10, 10], [0, 0], [31, 23]])
    fast = DiftMatcher().match(src, size, trg, size, kps)
    cosine = dift_reference_similarity(src, size, trg, size, kps).reshape(3, -1)
    assert (cosine.max(dim=1).values == cosine[:, 6 * 32 + 22]).all()
    assert (cosine[:, 14 * 32 + 2] == cosine[:, 6 * 32 + 22]).all()  # B ties with A exactly
    reference_best = cosine.argmax(dim=1)
    assert (reference_best == 6 * 32 + 22).all()
    np.testing.assert_array_equal(fast, [[22, 6]] * 3)


def test_keypoint_outside_the_source_image_is_named():
    src, trg, _ = _pair(4, (6, 8), (64, 48), (6, 8), (64, 48), 8)
    kps = np.array([[1, 1], [64, 10]])
    with pytest.raises(DitfError, match=r"keypoint 1 at \(x=64, y=10\)"):
        DiftMatcher().match(src, (64, 48), trg, (64, 48), kps)
    with pytest.raises(DitfError, match="keypoint 0"):
        DiftMatcher().match(src, (64, 48), trg, (64, 48), np.array([[-1, 3]]))


def test_unknown_protocol():
    with pytest.raises(DitfError, match="dift, geoaware"):
        make_matcher("dino")


# --------------------------------------------------------------------------------------------
# nearest neighbours
# --------------------------------------------------------------------------------------------


def test_faiss_and_matmul_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(25, 256, generator=g), dim=1)
    database = F.normalize(torch.randn(3600, 256, generator=g), dim=1)
    torch_nn = nearest_neighbours(queries, database, "torch")
    assert torch.equal(torch_nn, (queries @ database.T).argmax(1))
    assert torch.equal(nearest_neighbours(queries, database, "faiss"), torch_nn)
    with pytest.raises(DitfError):
        nearest_neighbours(queries, database, "annoy")


# --------------------------------------------------------------------------------------------
# geoaware
# --------------------------------------------------------------------------------------------


def test_geoaware_frame_follows_geoaware_sc():
    frame = geoaware_frame((500, 375))  # landscape: 840 x 630, 105 rows of padding on top
    assert (frame.scale, frame.offset_x, frame.offset_y, frame.content_width, frame.content_height) == (1.68, 0, 105, 840, 630)
    frame = geoaware_frame((333, 500))  # portrait: width round(840 * 333 / 500) = 559
    assert (frame.offset_x, frame.offset_y, frame.content_width) == (140, 0, 559)
    assert geoaware_threshold_scale((500, 375)) == pytest.approx(1.68)


@pytest.mark.parametrize("size, factor", [((840, 420), 1), ((420, 210), 2)])
def test_geoaware_mirrored_target_gives_known_cells(size, factor):
    """Target = source mirrored left-right; grids aligned with the 60x60 frame cells.

    A 2:1 image fills frame rows 210..629 (cells 15..44); a 30 x 60 token grid then puts one
    token per frame cell, so the source cell (i, j) must land on target cell (i, 59 - j).
    """
    src = torch.randn(30, 60, 64, generator=torch.Generator().manual_seed(7))
    trg = src.flip(1)
    rng = np.random.default_rng(7)
    kps = np.stack([rng.integers(0, size[0], 25), rng.integers(0, size[1], 25)], 1).astype(float)
    kps = np.vstack([kps, [[0, 0], [size[0] - 1, size[1] - 1]]])
    cell_x = np.floor(kps[:, 0] * factor / 14).astype(int)
    cell_y = np.floor((kps[:, 1] * factor + 210) / 14).astype(int)
    expected = np.stack([(14 * (59 - cell_x) + 7) / factor, (14 * cell_y + 7 - 210) / factor], 1)
    hard = GeoAwareMatcher().match(src, size, trg, size, kps)
    np.testing.assert_allclose(hard, expected, atol=1e-9)
    # with a sharp peak the windowed soft-argmax lands on the hard argmax
    for window in (11, 15):
        soft = GeoAwareMatcher(soft_window=window).match(src, size, trg, size, kps, trg_key="t")
        np.testing.assert_allclose(soft, expected, atol=1e-3)


def test_geoaware_translated_target_across_aspect_ratios():
    """Source landscape, target square with the same content shifted by 5 cells to the right."""
    g = torch.Generator().manual_seed(8)
    src = torch.randn(30, 60, 32, generator=g)  # 840 x 420: frame rows 210..629
    trg = torch.randn(60, 60, 32, generator=g)  # 840 x 840: no padding
    trg[20:50, 5:60] = src[:, 0:55]
    kps = np.array([[7.0, 7.0], [100.0, 50.0], [700.0, 400.0]])
    pred = GeoAwareMatcher().match(src, (840, 420), trg, (840, 840), kps)
    # source cell (row (y + 210) // 14 - 15, col x // 14) sits at target (row + 20, col + 5)
    rows = (kps[:, 1] + 210) // 14 - 15 + 20
    cols = kps[:, 0] // 14 + 5
    np.testing.assert_allclose(pred, np.stack([14 * cols + 7, 14 * rows + 7], 1))


def test_padding_cells_are_empty():
    """Target content in padding cells is never sampled: they hold zero vectors."""
    src = torch.randn(30, 60, 16, generator=torch.Generator().manual_seed(9))
    matcher = GeoAwareMatcher()
    targets = matcher._target_descriptors(src, (840, 420), None).reshape(60, 60, -1)
    assert targets[:15].abs().sum() == 0 and targets[45:].abs().sum() == 0
    assert (targets[15:45].norm(dim=-1) > 0.99).all()


def test_window_soft_argmax_as_geoaware():
    sim = torch.zeros(3, 3600)
    sim[0, 10 * 60 + 10] = sim[0, 10 * 60 + 11] = 1.0  # two equal neighbours: half way
    sim[1, 10 * 60 + 10] = 1.0  # a second peak far outside the window is masked away
    sim[1, 40 * 60 + 40] = 0.99
    sim[2] = sim[1]
    out = window_soft_argmax(sim[:2], window=15)
    torch.testing.assert_close(out, torch.tensor([[10.5, 10.0], [10.0, 10.0]]), atol=1e-4, rtol=0)
    # without a window the far peak pulls the estimate: weights 1 : exp(-0.5)
    pulled = window_soft_argmax(sim[2:], window=0)
    w = np.exp(-0.01 / 0.02)
    expected = (10 + w * 40) / (1 + w)
    torch.testing.assert_close(pulled, torch.tensor([[expected, expected]], dtype=torch.float32), atol=1e-2, rtol=0)


def test_soft_window_must_be_odd():
    with pytest.raises(DitfError, match="odd"):
        GeoAwareMatcher(soft_window=14)


def test_window_multiplies_outside_cells_by_zero_like_geoaware():
    """GeoAware zeroes the similarities outside the window (they still enter the softmax with
    value 0); with weak similarities that pulls the estimate toward the grid centre."""
    sim = torch.full((1, 3600), 0.04)
    sim[0, 10 * 60 + 10] = 0.05
    values = np.zeros((60, 60))
    values[3:18, 3:18] = 0.04  # the 15 x 15 window around (10, 10)
    values[10, 10] = 0.05
    weights = np.exp((values - values.max()) / 0.02)
    weights /= weights.sum()
    coords = np.linspace(-1, 1, 60)
    expected_x = ((weights.sum(0) * coords).sum() + 1) * 59 / 2
    expected_y = ((weights.sum(1) * coords).sum() + 1) * 59 / 2
    out = window_soft_argmax(sim, window=15)
    torch.testing.assert_close(out, torch.tensor([[expected_x, expected_y]], dtype=torch.float32), atol=1e-3, rtol=0)
    assert out[0, 0] > 20  # far from the peak at 10
