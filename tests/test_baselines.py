"""Baselines (DINOv2, DIFT on the SD UNet) in the same store, and DiT + DINOv2 fusion at match time."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it


import numpy as np
import pytest
import torch
from PIL import Image

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.match.fusion import co_pca, fuse_pair, fusion_label, normalise, resample
from ditf_pipeline.match.matchers import DiftMatcher
from ditf_pipeline.models import get_spec, load_adapter
from ditf_pipeline.match.predict import MatchSettings, predict
from ditf_pipeline.store.feature_store import FeatureStore


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- DINOv2 ---------------------------------------------------------------------------------
def test_dinov2_token_facet_is_the_block_output_without_cls():
    adapter = load_adapter("tiny-dinov2", device="cpu")
    pixels = torch.randn(2, 3, 5 * 14, 8 * 14, generator=torch.Generator().manual_seed(0))
    fired = []
    last = adapter.model.encoder.layer[-1].register_forward_hook(lambda *a: fired.append(1))
    try:
        feats = adapter.forward_intermediates(pixels, {}, 0, [1, 2])
    finally:
        last.remove()
    assert not fired, "the forward went past the deepest requested block"
    out = adapter.model(pixel_values=pixels, output_hidden_states=True)
    for k in (1, 2):
        assert feats[k].modulation is None
        assert feats[k].pre_adaln.shape == (2, 5, 8, 32)
        # hidden_states[k + 1] is the output of block k, before the final LayerNorm; token 0 is CLS
        reference = out.hidden_states[k + 1][:, 1:].reshape(2, 5, 8, 32)
        assert torch.equal(feats[k].pre_adaln, reference)
    with pytest.raises(DitfError, match="no AdaLN"):
        adapter.modulation({}, 0, [1])


def test_dinov2_input_is_imagenet_normalised_on_a_14_pixel_grid():
    adapter = load_adapter("dinov2-b14", device="cpu")  # no weights are loaded for this
    spec = get_spec("dinov2-b14")
    assert (spec.default_k, spec.img_size, spec.hidden_size, adapter.patch_stride) == (11, 840, 768, 14)
    assert (get_spec("dinov2-l14").default_k, get_spec("dinov2-g14").default_k, get_spec("dinov2-s14").default_k) == (23, 39, 11)
    img = Image.new("RGB", (500, 375), (255, 0, 128))
    pixels = adapter.prepare_image(img, 840)
    assert pixels.shape == (3, 630, 840) and pixels.dtype == np.float32  # 630 = 45 x 14
    expected = (np.array([255, 0, 128]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(pixels[:, 10, 10], expected, rtol=1e-5, atol=1e-5)
    assert adapter.feature_shape(840, 11) == (60, 60, 768)


# ---- DIFT: the SD UNet ----------------------------------------------------------------------
def test_sd_unet_feature_is_the_up_block_output_after_ddpm_noise():
    adapter = load_adapter("tiny-sd", device="cpu")
    prompt = adapter.encode_prompts(["a photo of a cat"])[0]
    adapter.release_text_encoders()
    latents = adapter.encode_images(torch.rand(2, 3, 128, 128) * 2 - 1, torch.Generator().manual_seed(0))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noisy = adapter.add_noise(latents, noise, 261)
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[261]
    expected = alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)

    reference = {}
    unet = adapter.unet
    handles = [unet.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: reference.__setitem__(i, o)) for i in range(4)]
    try:
        feats = adapter.forward_intermediates(noisy, prompt, 261, [0, 1, 2, 3], stop_early=False)
        unet(noisy, torch.full((2,), 261), encoder_hidden_states=prompt["prompt_embeds"][None].expand(2, -1, -1))
    finally:
        for handle in handles:
            handle.remove()
    for k in range(4):
        assert feats[k].modulation is None
        assert torch.equal(feats[k].pre_adaln, reference[k].permute(0, 2, 3, 1)), k
        assert feats[k].pre_adaln.shape[1:] == adapter.feature_shape(128, k)
    # SD 2.1's strides: up blocks 0..3 sit at img/32, img/16, img/8, img/8
    assert [adapter.feature_shape(128, k)[0] for k in range(4)] == [4, 8, 16, 16]


def test_dift_resizes_to_a_square():
    adapter = load_adapter("sd2.1", device="cpu")  # no weights are loaded for this
    spec = get_spec("sd2.1")
    assert (spec.default_k, spec.default_t, spec.img_size, spec.hidden_size) == (1, 261, 768, 1280)
    pixels = adapter.prepare_image(Image.new("RGB", (500, 333), (255, 255, 255)), 768)
    assert pixels.shape == (3, 768, 768)
    assert np.allclose(pixels, 1.0)  # (x / 255 - 0.5) * 2


# ---- both baselines in the store ------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_store(tmp_path_factory):
    """tiny-sd (DIFT) and tiny-dinov2 extracted into one store on generated SPair-layout data."""
    base = tmp_path_factory.mktemp("baselines")
    root = make_spair_demo(base / "SPair", pairs_per_category=2)
    dataset = get_dataset("spair", root, "test")
    store = FeatureStore(base / "s.zarr")
    for model, img_size in (("tiny-sd", 64), ("tiny-dinov2", 112)):
        spec = get_spec(model)
        settings = ExtractSettings(ks=[spec.default_k], ts=[spec.default_t], img_size=img_size, ensemble_size=2)
        Extractor(load_adapter(model, device="cpu"), store, settings).run(dataset, progress=False)
    return store, dataset, root


def test_baselines_store_only_the_raw_map(baseline_store):
    store, dataset, _ = baseline_store
    assert store.feature_keys("spair") == [("spair", "tiny-dinov2", 3, 0), ("spair", "tiny-sd", 1, 261)]
    dino = store.open_features("spair", "tiny-dinov2", 3, 0)
    sd = store.open_features("spair", "tiny-sd", 1, 261)
    for arrays in (dino, sd):
        assert arrays.complete().all()
        assert arrays.modulation_names == []
        assert not any(name in arrays.group for name in ("shift", "scale", "gate", "shift_t"))
    assert dino.config["ensemble_size"] == 1 and dino.config["prompt"] == "none"  # deterministic, unconditioned
    assert dino.config["pixels"] == "ImageNet mean/std" and "14" in dino.config["resize"]
    assert sd.config["ensemble_size"] == 2 and sd.config["prompt"] == "template"
    assert sd.group["pre_adaln"].shape[1:] == (4, 4, 32)  # 64 px square, up block 1 at img/16
    record = dataset.images()[0]
    row = store.image_rows("spair")[record.key]
    z, modulation = dino.read_image(row)
    assert modulation == {}
    from ditf_pipeline.core.images import load_rgb

    adapter = load_adapter("tiny-dinov2", device="cpu")
    pixels = adapter.prepare_image(load_rgb(record.path), 112)
    assert z.shape[:2] == (pixels.shape[1] // 14, pixels.shape[2] // 14)
    direct = adapter.forward_intermediates(torch.from_numpy(pixels)[None], {}, 0, [3])[3].pre_adaln[0]
    np.testing.assert_array_equal(z, direct.numpy().astype(np.float16))


def test_adaln_variant_on_a_baseline_key_is_a_clear_error(baseline_store):
    store, dataset, _ = baseline_store
    with pytest.raises(DitfError, match="no(ne)?.*use variant 'raw'"):
        predict(store, dataset, "tiny-dinov2", 3, 0, MatchSettings(variant="adaln+cd"), progress=False)
    assert not store.prediction_groups("spair", "tiny-dinov2", 3, 0)
    report = predict(store, dataset, "tiny-dinov2", 3, 0, MatchSettings(variant="raw"), progress=False)
    assert report.matched == len(dataset.pairs())


# ---- fusion ---------------------------------------------------------------------------------
def _maps(seed: int, shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def test_fused_shapes_common_grid_and_unit_norm():
    dit_src, dit_trg, dino_src, dino_trg = _maps(0, [(4, 6, 48), (5, 5, 48), (6, 9, 24), (7, 7, 24)])
    src, trg = fuse_pair(dit_src, dit_trg, dino_src, dino_trg, pca_dim=16)
    assert src.shape == (6, 9, 16 + 24) and trg.shape == (7, 7, 16 + 24)  # the finer grid of each image
    for fused in (src, trg):
        torch.testing.assert_close(fused.norm(dim=-1), torch.ones(fused.shape[:2]))
        # each part carries half the weight: |part| = 1/sqrt(2) after the final normalisation
        torch.testing.assert_close(fused[..., :16].norm(dim=-1), torch.full(fused.shape[:2], 0.5**0.5))
    # pca_dim is clamped to the width; 0 disables the PCA (the DiT part keeps its 48 channels)
    assert fuse_pair(dit_src, dit_trg, dino_src, dino_trg, pca_dim=4096)[0].shape[-1] == 48 + 24
    assert fuse_pair(dit_src, dit_trg, dino_src, dino_trg, pca_dim=0)[0].shape[-1] == 48 + 24
    assert fusion_label("adaln+cd", "dinov2-b14", 1280) == "adaln+cd+dinov2-b14-pca1280"


def test_co_pca_is_the_pair_pca_per_pair_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    # tokens with a clear spectrum: 3 strong directions + small noise
    basis = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]
    def tokens(n):
        return (torch.randn(n, 3, generator=gen) * torch.tensor([9.0, 5.0, 3.0])) @ basis.T + 0.01 * torch.randn(n, 32, generator=gen)
    a, b, c = tokens(20).reshape(4, 5, 32), tokens(30).reshape(5, 6, 32), tokens(25).reshape(5, 5, 32)
    state = torch.random.get_rng_state()
    pa, pb = co_pca(a, b, 3)
    assert torch.equal(torch.random.get_rng_state(), state), "the PCA must not consume the global RNG"
    pa2, pb2 = co_pca(a, b, 3)
    assert torch.equal(pa, pa2) and torch.equal(pb, pb2)  # deterministic
    # equals the exact PCA of the stacked, jointly centred tokens (up to the sign of each axis)
    stacked = torch.cat([a.reshape(-1, 32), b.reshape(-1, 32)])
    centred = stacked - stacked.mean(0)
    exact = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:3].T
    ours = torch.cat([pa.reshape(-1, 3), pb.reshape(-1, 3)])
    torch.testing.assert_close(ours.abs(), exact.abs(), rtol=1e-3, atol=1e-3)
    # per pair: the same source image gets another projection with another target
    pa_other, _ = co_pca(a, c, 3)
    assert not torch.allclose(pa_other, pa, atol=1e-3)


def test_fusion_beats_either_part_alone():
    """Part A (the 'DiT', coarse grid) only knows the column, part B (the 'DINO', fine grid) only the row."""
    gen = torch.Generator().manual_seed(0)
    column_codes, row_codes = torch.randn(8, 16, generator=gen), torch.randn(16, 12, generator=gen)

    def image(seed):
        noise = torch.Generator().manual_seed(seed)
        a = column_codes[None].expand(8, 8, 16) + 0.05 * torch.randn(8, 8, 16, generator=noise)
        b = row_codes[:, None].expand(16, 16, 12) + 0.05 * torch.randn(16, 16, 12, generator=noise)
        return a, b

    (a_src, b_src), (a_trg, b_trg) = image(1), image(2)
    size = (128, 128)  # image pixels; keypoints at the centres of the 16 x 16 cells
    grid = torch.arange(16) * 8 + 4
    kps = np.stack(np.meshgrid(grid.numpy(), grid.numpy()), axis=-1).reshape(-1, 2)
    matcher = DiftMatcher()

    def pck(src, trg):
        pred = matcher.match(src, size, trg, size, kps)
        return float((np.linalg.norm(pred - kps, axis=1) <= 0.1 * 128).mean())

    fused = pck(*fuse_pair(a_src, a_trg, b_src, b_trg, pca_dim=8))
    only_a = pck(normalise(resample(a_src, (16, 16))), normalise(resample(a_trg, (16, 16))))
    only_b = pck(normalise(b_src), normalise(b_trg))
    assert fused > 0.95, fused
    assert only_a < 0.3 and only_b < 0.3, (only_a, only_b)


def test_predict_with_fuse_uses_both_keys_of_the_store(baseline_store):
    store, dataset, _ = baseline_store
    settings = MatchSettings(variant="raw", fuse="tiny-dinov2", pca_dim=8)
    report = predict(store, dataset, "tiny-sd", 1, 261, settings, progress=False)
    assert report.matched == len(dataset.pairs())
    assert settings.name == "raw+tiny-dinov2-pca8/dift"
    stored = store.open_predictions(("spair", "tiny-sd", 1, 261), settings.name)
    assert stored.config["variant"] == "raw+tiny-dinov2-pca8"
    assert stored.config["fuse"]["model"] == "tiny-dinov2" and stored.config["fuse"]["pca_dim"] == 8
    # the first pair, recomputed by hand from the two keys
    pair = dataset.pairs()[0]
    rows = store.image_rows("spair")
    sd, dino = store.open_features("spair", "tiny-sd", 1, 261), store.open_features("spair", "tiny-dinov2", 3, 0)

    def read(arrays, key):
        return torch.from_numpy(arrays.read_image(rows[key])[0].astype(np.float32))

    src, trg = fuse_pair(read(sd, pair.src_key), read(sd, pair.trg_key), read(dino, pair.src_key), read(dino, pair.trg_key), 8)
    expected = DiftMatcher().match(src, pair.src_size, trg, pair.trg_size, pair.src_kps)
    np.testing.assert_array_equal(stored.read()[pair.pair_id], expected.astype(np.float32))
    with pytest.raises(DitfError, match="no features for spair/dinov2-b14"):
        predict(store, dataset, "tiny-sd", 1, 261, MatchSettings(variant="raw", fuse="dinov2-b14"), progress=False)


def test_compare_command_prints_one_table(baseline_store):
    from ditf_cli.main import app
    from typer.testing import CliRunner

    store, _, root = baseline_store
    args = ["compare", "--store", str(store.path), "--data-root", str(root), "--split", "test", "--no-progress",
            "--pca-dim", "8", "-r", "tiny-sd", "-r", "tiny-dinov2:raw", "-r", "tiny-sd:raw:tiny-dinov2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("tiny-sd") and " raw " in f"{line} " for line in lines)
    assert any(line.startswith("tiny-dinov2") for line in lines)
    assert any("raw+tiny-dinov2-pca8" in line for line in lines)
    bad = CliRunner().invoke(app, ["compare", "--store", str(store.path), "--data-root", str(root), "--split", "test",
                                   "-r", "tiny-dinov2:adaln", "--no-progress"])
    assert bad.exit_code == 1 and "variant 'raw' only" in bad.output
