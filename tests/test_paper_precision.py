"""`--precision paper`: the authors' cast points, checked against plain re-statements of their code.

References restate DiTF's `eval_spair.py` (feature: channels zeroed, nn.LayerNorm, modulation on
bf16 tensors, `.to(float16)`; matching: `nn.Upsample(mode='bilinear')` in fp16, `F.normalize`,
`torch.mm`, numpy argmax, one keypoint at a time) and BFL's `timestep_embedding` input
(``1000 * t`` on a bf16 tensor).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.models import load_adapter
from ditf_pipeline.match.paper import PaperDiftMatcher, paper_feature, paper_matching
from ditf_pipeline.match.predict import MatchSettings, predict
from ditf_pipeline.store.feature_store import FeatureStore

D = 24


def _bf16_values(shape, seed):
    """Random values that are exact in bf16 and fp16 (what a paper key stores)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(torch.bfloat16).float().numpy()


def _authors_feature(z: np.ndarray, shift: np.ndarray, scale: np.ndarray, channels) -> torch.Tensor:
    ft = torch.from_numpy(z).to(torch.bfloat16).permute(2, 0, 1)[None]  # b c h w, as they store it
    _, c, h, w = ft.shape
    ft[:, channels, :, :] = 0.0
    ft = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)(ft.reshape(1, c, h * w).transpose(1, 2))
    ft = ft.transpose(1, 2).reshape(1, c, h, w)
    shift = torch.from_numpy(shift).to(torch.bfloat16)[None, :, None, None]
    scale = torch.from_numpy(scale).to(torch.bfloat16)[None, :, None, None]
    return ((1 + scale) * ft + shift).to(torch.float16)[0].permute(1, 2, 0)


def test_paper_feature_is_the_authors_cd_then_layernorm_then_modulation_in_bf16():
    z = _bf16_values((5, 7, D), 0)
    z[..., 3] *= 200  # a massive channel
    z = torch.from_numpy(z).to(torch.bfloat16).float().numpy()
    modulation = {"shift": _bf16_values((D,), 1), "scale": _bf16_values((D,), 2)}
    ours = paper_feature("adaln+cd", z, modulation, [3, 10])
    assert ours.dtype == torch.float16
    assert torch.equal(ours, _authors_feature(z, modulation["shift"], modulation["scale"], [3, 10]))
    assert torch.equal(paper_feature("adaln", z, modulation), _authors_feature(z, modulation["shift"], modulation["scale"], []))
    assert torch.equal(paper_feature("raw", z), torch.from_numpy(z).to(torch.float16))
    # not the fp32 computation rounded once at the end
    from ditf_pipeline.match.features import compute_feature

    assert not torch.equal(ours, compute_feature("adaln+cd", z, modulation, [3, 10]).to(torch.float16))


def _authors_match(src, src_size, trg, trg_size, kps) -> np.ndarray:
    src_ft = src.permute(2, 0, 1)[None].to(torch.float16)
    trg_ft = trg.permute(2, 0, 1)[None].to(torch.float16)
    src_ft = nn.Upsample(size=src_size[::-1], mode="bilinear")(src_ft)
    trg_ft = nn.Upsample(size=trg_size[::-1], mode="bilinear")(trg_ft)
    h, w = trg_ft.shape[-2:]
    out = []
    for x, y in kps:
        num_channel = src_ft.size(1)
        src_vec = src_ft[0, :, y, x].view(1, num_channel)
        trg_vec = trg_ft.view(num_channel, -1).transpose(0, 1)
        src_vec = F.normalize(src_vec).transpose(0, 1)
        trg_vec = F.normalize(trg_vec)
        cos_map = torch.mm(trg_vec, src_vec).view(h, w).cpu().numpy()
        max_yx = np.unravel_index(cos_map.argmax(), cos_map.shape)
        out.append([max_yx[1], max_yx[0]])
    return np.asarray(out, dtype=np.float64)


def test_paper_matcher_is_the_authors_fp16_loop():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(6, 8, D, generator=gen).to(torch.float16)
    trg = torch.randn(5, 9, D, generator=gen).to(torch.float16)
    src_size, trg_size = (61, 47), (70, 41)
    kps = np.array([[0, 0], [60, 46], [13, 22], [31, 5], [44, 40]])
    ours = PaperDiftMatcher().match(src, src_size, trg, trg_size, kps)
    np.testing.assert_array_equal(ours, _authors_match(src, src_size, trg, trg_size, kps))
    assert PaperDiftMatcher().match(src, src_size, trg, trg_size, np.zeros((0, 2))).shape == (0, 2)


def test_bf16_flux_rounds_timestep_and_guidance_as_the_authors_code():
    adapter = load_adapter("tiny-flux", device="cpu", dtype="bf16")
    seen = []
    hook = adapter.transformer.time_text_embed.time_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        prompt = {"prompt_embeds": torch.zeros(4, 32), "pooled_prompt_embeds": torch.zeros(32)}
        adapter.forward_intermediates(torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16), prompt, 261, [0])
    finally:
        hook.remove()
    timestep, guidance = seen[0], seen[1]
    # BFL timestep_embedding: t = time_factor * t on the bf16 tensor (their t_vec has img.dtype)
    authors = float(1000.0 * torch.tensor([261 / 1000], dtype=torch.bfloat16)[0])
    assert float(timestep[0]) == authors == 262.0  # not 261: rounded in bf16, as their t_vec is
    assert float(guidance[0]) == 3504.0  # 3.5 * 1000 rounded in bf16


def test_paper_matching_applies_to_paper_keys_under_dift_only():
    assert paper_matching({"precision": "paper"}, "dift")
    assert not paper_matching({"precision": "paper"}, "geoaware")
    assert not paper_matching({"precision": "default"}, "dift") and not paper_matching({}, "dift")


@pytest.mark.slow
def test_paper_key_stores_bf16_values_and_matches_in_fp16(tmp_path):
    root = make_spair_demo(tmp_path / "data", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    dataset = get_dataset("spair", root, "test")
    store = FeatureStore(tmp_path / "s.zarr")
    adapter = load_adapter("tiny-flux", device="cpu", dtype="bf16")
    settings = ExtractSettings(ks=[2], ts=[260], img_size=96, ensemble_size=2, precision="paper")
    Extractor(adapter, store, settings).run(dataset, progress=False)
    arrays = store.open_features("spair", "tiny-flux", 2, 260)
    assert arrays.config["precision"] == "paper" and arrays.config["vae_dtype"] == "float32"
    z, modulation = arrays.read_image(0)
    z32 = torch.from_numpy(np.asarray(z, dtype=np.float32))
    assert torch.equal(z32.to(torch.bfloat16).float(), z32)  # the bf16 ensemble mean, held exactly
    for value in modulation.values():
        v = torch.as_tensor(np.asarray(value, dtype=np.float32))
        assert torch.equal(v.to(torch.bfloat16).float(), v)
    report = predict(store, dataset, "tiny-flux", 2, 260, MatchSettings(variant="adaln+cd", channels="none"), progress=False)
    assert report.matched == len(dataset.pairs())
    assert store.open_predictions(("spair", "tiny-flux", 2, 260), "adaln+cd/dift").config["precision"] == "paper"
