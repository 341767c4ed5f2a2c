"""The VAE encodes each image once; ensemble members are drawn from that one posterior.

Old path: the image repeated `ensemble` times, each copy encoded and its posterior sampled.
New path: one encode, then member m's latents = scale * ((mean + std * eps_m) - shift) with
eps_m (and the noise) from a generator seeded by (seed, image key, t, m). Same distribution,
an eighth of the VAE work; the VAE runs in fp32 whatever the DiT's dtype.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings, member_draws, store_config
from ditf_pipeline.models import load_adapter
from ditf_pipeline.store.feature_store import FeatureStore

KEY, T = "cat/img1.jpg", 260


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-flux", device="cpu")


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    return rng.random((3, 64, 96), dtype=np.float32) * 2 - 1


@pytest.fixture(scope="module")
def prompt(adapter):
    return adapter.encode_prompts(["a photo of a cat"])[0]


def _extractor(adapter, tmp_path, **settings) -> Extractor:
    base = dict(ks=[1, 3], ts=[T], img_size=96, ensemble_size=4)
    return Extractor(adapter, FeatureStore(tmp_path / "s.zarr"), ExtractSettings(**{**base, **settings}))


def test_posterior_is_the_vaes_and_samples_follow_the_old_formula(adapter, pixels):
    image = torch.from_numpy(pixels)[None]
    posterior = adapter.encode_posterior(image)
    dist = adapter.vae.encode(image).latent_dist
    assert torch.equal(posterior.mean, dist.mean) and torch.equal(posterior.std, dist.std)
    config = adapter.vae.config
    # eps = 0 gives the encoded mean, in the DiT's latent units
    np.testing.assert_array_equal(posterior.sample(torch.zeros_like(posterior.mean)),
                                  (dist.mean - config.shift_factor) * config.scaling_factor)
    # the old path (copies encoded, each sampled by diffusers) with the same standard-normal draws
    eps = torch.randn((4, *posterior.mean.shape[1:]), generator=torch.Generator().manual_seed(1))
    copies = adapter.vae.encode(image.expand(4, -1, -1, -1)).latent_dist
    old = (copies.mean + copies.std * eps - config.shift_factor) * config.scaling_factor
    new = posterior.sample(eps)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    assert not torch.equal(new[0], new[1])  # members get different posterior samples


def test_vae_runs_once_per_image_for_every_t_and_member(adapter, tmp_path, monkeypatch):
    root = make_spair_demo(tmp_path / "data", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    dataset = get_dataset("spair", root, "test")
    calls = []
    vae = adapter.vae
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **kw: calls.append(x.shape[0]) or original(x, *a, **kw))
    report = _extractor(adapter, tmp_path, ts=[90, T], ensemble_size=4, batch_size=3).run(dataset, progress=False)
    assert report.extracted == len(dataset.images()) >= 2
    assert calls == [1] * report.extracted  # one image per call, one call per image (not per t, not per member)


def test_members_are_seeded_per_image_t_and_member_whatever_the_batching(adapter, pixels, prompt, tmp_path, monkeypatch):
    eps_a, noise_a = member_draws(0, KEY, T, range(0, 4), (16, 8, 12))
    eps_b, noise_b = member_draws(0, KEY, T, range(2, 4), (16, 8, 12))
    assert torch.equal(eps_a[2:], eps_b) and torch.equal(noise_a[2:], noise_b)
    assert not torch.equal(eps_a[0], eps_a[1]) and not torch.equal(eps_a, noise_a)
    assert not torch.equal(member_draws(0, KEY, 90, range(1), (4,))[0], member_draws(0, KEY, T, range(1), (4,))[0])
    assert not torch.equal(member_draws(0, "other", T, range(1), (4,))[0], member_draws(0, KEY, T, range(1), (4,))[0])

    seen: dict = {}
    forward = adapter.forward_intermediates

    def recording(noisy, *args, **kwargs):
        seen.setdefault(batch, []).append(noisy.clone())
        return forward(noisy, *args, **kwargs)

    monkeypatch.setattr(adapter, "forward_intermediates", recording)
    results = {}
    for batch in (None, 1, 3):
        results[batch] = _extractor(adapter, tmp_path / str(batch), batch_size=batch).features_for(pixels, prompt, KEY, T, [1, 3])
    whole = torch.cat(seen[None])
    for batch in (1, 3):
        assert torch.equal(torch.cat(seen[batch]), whole)  # every member's noisy latents, bit for bit
        for k in (1, 3):
            # the DiT's matrix products are not batch-invariant in the last bits on every backend
            np.testing.assert_allclose(results[batch][k][0], results[None][k][0], atol=1e-3)
    rerun = _extractor(adapter, tmp_path / "again", batch_size=3).features_for(pixels, prompt, KEY, T, [1, 3])
    for k in (1, 3):
        np.testing.assert_array_equal(rerun[k][0], results[3][k][0])  # deterministic


def test_vae_stays_fp32_under_a_bf16_dit():
    adapter = load_adapter("tiny-flux", device="cpu", dtype="bf16")
    assert adapter.vae.dtype == torch.float32 and adapter.transformer.dtype == torch.bfloat16
    posterior = adapter.encode_posterior(torch.zeros(1, 3, 32, 32))
    assert posterior.mean.dtype == torch.float32
    assert posterior.sample(torch.zeros_like(posterior.mean)).dtype == torch.bfloat16


def test_store_config_records_the_fidelity_choices(adapter, tmp_path):
    config = store_config(adapter, ExtractSettings(ks=[1], ts=[T], img_size=96))
    assert config["vae_dtype"] == "float32" and config["precision"] == "default"
    assert config["resample"] == "pil-bicubic" and "half to even" in config["resize_rule"]
    assert "once per image" in config["vae_sampling"]
    paper = store_config(adapter, ExtractSettings(ks=[1], ts=[T], img_size=96, precision="paper", resample="cv2-bilinear"))
    assert paper["precision"] == "paper" and paper["resample"] == "cv2-bilinear"


def test_bad_precision_and_resample_are_refused(adapter, tmp_path):
    with pytest.raises(DitfError, match="precision paper runs the DiT in bf16"):
        _extractor(adapter, tmp_path, precision="paper")
    with pytest.raises(DitfError, match="unknown --precision"):
        _extractor(adapter, tmp_path, precision="half")
    with pytest.raises(DitfError, match="unknown --resample"):
        _extractor(adapter, tmp_path, resample="lanczos")
