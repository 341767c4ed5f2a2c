"""The pruned dift argmax: the same pick as sampling every pixel, the first maximum on ties, and
at least the materialised float32 path's agreement with a float64 referee."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.matchers import DiftMatcher, _integer_keypoints, upsampled_norms, upsampled_vectors
from ditf_pipeline.match.pruned import exact_dots, exhaustive_argmax, float64_referee_argmax, pruned_argmax, target_blocks

#  (grid h, w), (image width, height): SPair-like, odd, downsampled, one-cell, identity
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((7, 5), (31, 20)), ((3, 9), (9, 3)),
          ((1, 4), (7, 5)), ((10, 10), (4, 6)), ((6, 8), (8, 6))]


def _smooth(g, h, w, channels):
    """Real-like maps: a coarse random field enlarged 2x plus noise (near ties as real features have)."""
    coarse = torch.randn(1, channels, max(1, h // 2), max(1, w // 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return smooth + 0.3 * torch.randn(h, w, channels, generator=g)


def _cases(seed):
    """(source vectors (N, D) float64, target (h * w, D) float32, size): random, real-like,
    small integers (exact ties among dots) and constant maps (every pixel ties)."""
    g = torch.Generator().manual_seed(seed)
    for k, ((h, w), size) in enumerate(SHAPES):
        trg = _smooth(g, h, w, 16) if k % 2 else torch.randn(h, w, 16, generator=g)
        vectors = torch.randn(6, 16, generator=g, dtype=torch.float64)
        yield vectors, trg, size
        yield vectors.round(), trg.round(), size
        yield vectors[:3], trg[:1, :1].expand(h, w, -1).contiguous(), size


def test_pruned_pick_equals_sampling_every_pixel():
    checked = 0
    for seed in range(4):
        for vectors, trg, size in _cases(seed):
            blocks = target_blocks(trg, size)
            flat = trg.reshape(-1, trg.shape[-1])
            assert pruned_argmax(vectors, flat, blocks).tolist() == exhaustive_argmax(vectors, flat, blocks).tolist()
            checked += len(vectors)
    assert checked > 300


def test_pruned_pick_is_the_float64_referees_up_to_one_rounding():
    """torch's upsampling kernel rounds its four-tap sums its own way: equal picks, or scores
    within a few float64 roundings of each other."""
    for vectors, trg, size in _cases(7):
        blocks = target_blocks(trg, size)
        flat = trg.reshape(-1, trg.shape[-1])
        got = pruned_argmax(vectors, flat, blocks)
        dots = torch.stack([torch.from_numpy(exact_dots(flat, np.arange(len(flat)), v)) for v in vectors])
        dots = dots.reshape(len(vectors), *trg.shape[:2])
        expected = float64_referee_argmax(dots, blocks)
        up = F.interpolate(dots[:, None], size=blocks.norms.shape, mode="bilinear", align_corners=False)
        scores = (up[:, 0] / torch.from_numpy(blocks.norms)).reshape(len(dots), -1)
        rows = torch.arange(len(dots))
        gap = (scores[rows, expected] - scores[rows, got]).abs()
        assert torch.all(gap <= 1e-14 * scores[rows, expected].abs().clamp_min(1))


@pytest.mark.parametrize("upsample", ["pruned", "materialise"])
def test_ties_pick_the_first_maximum_in_row_major_order(upsample):
    """Equal maxima in several cells: the earliest in row-major order wins (the pruned search
    visits blocks by bound, so its tie rule is its own)."""
    h, w, size = 6, 8, (8, 6)  # identity upsampling: one pixel per block, bound == score
    trg = torch.ones(h, w, 4)  # every pixel has the same norm
    src = torch.ones(1, 1, 4)
    matcher = DiftMatcher(upsample=upsample)
    # dots of the one source vector: a constant map gives 4 everywhere -> first pixel
    assert matcher.match(src, (1, 1), trg, size, [[0, 0]]).tolist() == [[0.0, 0.0]]
    trg = torch.zeros(h, w, 4)
    trg[..., 1] = 1.0  # norm 1, cosine 0 with the source direction e0 below
    src = torch.zeros(1, 1, 4)
    src[..., 0] = 1.0
    for y, x in [(4, 6), (1, 5), (1, 2), (3, 0)]:
        trg[y, x] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert matcher.match(src, (1, 1), trg, size, [[0, 0]]).tolist() == [[2.0, 1.0]]


def _referee_scores(src, src_size, trg, trg_size, kps) -> torch.Tensor:
    """Float64 everything: source vectors, matmul, F.interpolate of the dots, norms: (N, H * W)."""
    src64, trg64 = torch.as_tensor(src).double(), torch.as_tensor(trg).double()
    xs, ys = _integer_keypoints(kps, src_size)
    vectors = upsampled_vectors(src64, src_size, xs, ys)
    h, w, d = trg64.shape
    dots = (vectors @ trg64.reshape(h * w, d).T).reshape(-1, 1, h, w)
    tw, th = trg_size
    up = F.interpolate(dots, size=(th, tw), mode="bilinear", align_corners=False).reshape(len(xs), -1)
    return up / upsampled_norms(trg64, trg_size).reshape(1, -1).clamp_min(1e-300)


def _referee(src, src_size, trg, trg_size, kps) -> np.ndarray:
    """The float64 referee's pick: the first maximum of `_referee_scores`."""
    return _referee_scores(src, src_size, trg, trg_size, kps).argmax(dim=1).numpy()


def test_pruned_agrees_with_the_float64_referee_at_least_as_often_as_materialising():
    """On maps with a maximum, the pruned pick is the referee's at least as often as the float32
    one. Maps of one repeated vector are judged apart: every pixel scores the same to within
    rounding there, so any pick is as right as the referee's own (which rounding decides);
    each method must pick a pixel whose referee score is the maximum to 1e-12."""
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    agree = {"pruned": 0, "materialise": 0}
    total = 0
    for k in range(12):
        (h, w), size = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((7, 5), (31, 20))][k % 3]
        maker = _smooth if k % 2 else (lambda g, h, w, c: torch.randn(h, w, c, generator=g))
        src, trg = maker(g, h, w, 256).half(), maker(g, h, w, 256).half()
        tied = k % 4 == 3
        if tied:
            trg = trg[:1, :1].expand(h, w, -1).contiguous()  # all tied
        kps = np.stack([rng.integers(0, size[0], 10), rng.integers(0, size[1], 10)], 1)
        scores = _referee_scores(src, size, trg, size, kps)
        expected = scores.argmax(dim=1).numpy()
        for mode in agree:
            xy = DiftMatcher(upsample=mode).match(src, size, trg, size, kps)
            picks = (xy[:, 1] * size[0] + xy[:, 0]).astype(np.int64)
            if tied:
                best = scores.max(dim=1).values
                got = scores[torch.arange(len(picks)), torch.from_numpy(picks)]
                assert torch.all(best - got <= 1e-12 * best.abs()), (mode, k)
            else:
                agree[mode] += int((picks == expected).sum())
        total += 0 if tied else len(kps)
    assert agree["pruned"] >= agree["materialise"], agree
    assert agree["pruned"] >= 0.95 * total, agree


def test_upsample_method_is_checked(monkeypatch):
    with pytest.raises(DitfError, match="unknown upsample method"):
        DiftMatcher(upsample="fast")
    assert DiftMatcher().upsample == "materialise"  # the default: the authors' float32 maps
    monkeypatch.setenv("DITF_MATCH_UPSAMPLE", "pruned")
    assert DiftMatcher().upsample == "pruned"


def test_pixels_past_the_last_cell_centre_tie_and_the_first_wins():
    """Past the last cell centre every pixel reads that cell alone: equal scores, so the first
    such pixel (row-major) is the pick. (The materialised float32 path misses it: its float32
    norms differ by an ulp from pixel to pixel there.)"""
    g = torch.Generator().manual_seed(5)
    for h, w, width, height in [(4, 4, 40, 40), (30, 40, 500, 375), (40, 30, 333, 500)]:
        trg = torch.randn(h, w, 64, generator=g)
        # the source vector near the last cell: the best cosine is in the corner region
        src = trg[h - 1:, w - 1:] + 0.01 * torch.randn(1, 1, 64, generator=g)
        # first pixel whose source coordinate (in/out) (i + 0.5) - 0.5 reaches the last centre
        y0 = next(y for y in range(height) if h / height * (y + 0.5) - 0.5 >= h - 1)
        x0 = next(x for x in range(width) if w / width * (x + 0.5) - 0.5 >= w - 1)
        xy = DiftMatcher(upsample="pruned").match(src, (1, 1), trg, (width, height), [[0, 0]])
        assert xy.tolist() == [[float(x0), float(y0)]], (h, w)
