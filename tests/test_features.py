"""Feature variants: formulas, the two channel-discard orders, the massive-channel detector."""

import numpy as np
import pytest
import torch

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.features import compute_feature, detect_massive_channels, variant_names

D = 48


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(5, 7, D)).astype(np.float16)
    z[..., 11] += 300  # a massive channel, as in real DiT streams
    names = ["shift", "scale", "gate", "shift_t", "scale_t", "shift_c", "scale_c"]
    modulation = {name: rng.normal(size=D).astype(np.float32) for name in names}
    return z, modulation


def _adaln_by_hand(z: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    mean = z.mean(-1, keepdims=True)
    var = z.var(-1, keepdims=True)
    return (1 + scale) * (z - mean) / np.sqrt(var + 1e-6) + shift


def test_names_are_stable():
    assert variant_names() == ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"]


def test_raw_is_z_in_float32():
    z, modulation = _inputs()
    out = compute_feature("raw", z, modulation)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), z.astype(np.float32))


@pytest.mark.parametrize("variant, shift, scale", [("adaln", "shift", "scale"), ("adaln-t", "shift_t", "scale_t"), ("adaln-c", "shift_c", "scale_c")])
def test_adaln_matches_formula(variant, shift, scale):
    z, modulation = _inputs()
    out = compute_feature(variant, torch.from_numpy(z), modulation)
    expected = _adaln_by_hand(z, modulation[shift], modulation[scale])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_conditioning_variants_differ():
    z, modulation = _inputs()
    tc, t_only, c_only = (compute_feature(v, z, modulation) for v in ("adaln", "adaln-t", "adaln-c"))
    assert not torch.allclose(tc, t_only) and not torch.allclose(tc, c_only)


def test_channel_discard_orders():
    z, modulation = _inputs()
    channels = [11, 30]
    adaln = compute_feature("adaln", z, modulation)
    pre = compute_feature("adaln+cd", z, modulation, channels)  # the public script's order
    post = compute_feature("adaln+cd-post", z, modulation, channels)  # the paper's wording

    # post: AdaLN first, then the channels are exactly zero and the others untouched
    assert torch.all(post[..., channels] == 0)
    keep = [c for c in range(D) if c not in channels]
    torch.testing.assert_close(post[..., keep], adaln[..., keep])

    # pre: the zeroed channels enter LayerNorm, so every channel changes and the discarded
    # ones come out as (1 + scale) * (0 - mean) / std + shift, not zero
    zeroed = z.astype(np.float32).copy()
    zeroed[..., channels] = 0
    np.testing.assert_allclose(pre.numpy(), _adaln_by_hand(zeroed, modulation["shift"], modulation["scale"]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pre[..., keep], adaln[..., keep], atol=1e-2)
    assert torch.all(pre[..., channels].abs() > 0)


def test_cache_is_not_modified():
    z, modulation = _inputs()
    t = torch.from_numpy(z.copy())
    compute_feature("adaln+cd", t, modulation, [11])
    compute_feature("adaln+cd-post", t, modulation, [11])
    np.testing.assert_array_equal(t.numpy(), z)


def test_unknown_variant_lists_known_ones():
    z, modulation = _inputs()
    with pytest.raises(DitfError) as info:
        compute_feature("adaln+magic", z, modulation)
    for name in variant_names():
        assert name in str(info.value)


def test_missing_vector_and_bad_channel_are_clear():
    z, modulation = _inputs()
    del modulation["shift_t"]
    with pytest.raises(DitfError, match="shift_t"):
        compute_feature("adaln-t", z, modulation)
    with pytest.raises(DitfError, match="out of range"):
        compute_feature("adaln+cd", z, modulation, [D])


def test_detect_massive_channels_finds_injected_ones():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20, 30, 256)).astype(np.float32)  # median mean|z| ~ 0.8
    z[..., 154] = 400 + rng.normal(size=(20, 30))
    z[..., 7] = -250 + rng.normal(size=(20, 30))  # sign does not matter: mean |z|
    z[..., 99] = 50  # large but only ~60x the median: not massive
    assert detect_massive_channels(z) == [7, 154]
    assert detect_massive_channels(torch.from_numpy(z).half()) == [7, 154]
    assert detect_massive_channels(z, ratio=50) == [7, 99, 154]


def test_detect_massive_channels_none_in_plain_noise():
    z = np.random.default_rng(2).normal(size=(10, 10, 128)).astype(np.float32)
    assert detect_massive_channels(z) == []
