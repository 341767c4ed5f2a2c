"""The DiT adapters capture exactly what the blocks compute, on every tiny family.

The reference for "what the block computes" is taken by our own hooks on the diffusers modules
(independent of the adapter's hooks): the input of `block.ff` for Flux double blocks, SD3 joint
blocks and PixArt blocks, and the first output of `norm` on the image tokens for Flux single
blocks. `modulate(z, shift, scale)` of the captured values must reproduce it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it

import dataclasses

import pytest
import torch

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.models import get_spec, load_adapter
from ditf_pipeline.adaln import modulate
from ditf_pipeline.models.base import DiTAdapter

FAMILIES = ["tiny-flux", "tiny-sd3", "tiny-pixart"]
PROMPT = "a photo of a cat"
TIMESTEP = 300
#: non-square on purpose: 96 x 128 px -> latents 12 x 16 -> token grid 6 x 8
PIXELS_HW = (96, 128)
BATCH = 2


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _inputs(adapter: DiTAdapter, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Noisy latents of a seeded random non-square batch, and the prompt embedding."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(BATCH, 3, *PIXELS_HW, generator=gen) * 2 - 1
    latents = adapter.encode_images(pixels, torch.Generator().manual_seed(seed))
    noise = torch.randn(latents.shape, generator=gen).to(latents.dtype)
    prompt = adapter.encode_prompts([PROMPT])[0]
    adapter.release_text_encoders()
    return adapter.add_noise(latents, noise, TIMESTEP), prompt


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    adapter = load_adapter(request.param, device="cpu")
    noisy, prompt = _inputs(adapter)
    return adapter, noisy, prompt


def _block(adapter: DiTAdapter, k: int) -> torch.nn.Module:
    transformer = adapter.transformer
    if adapter.spec.family == "flux" and adapter.block_kind(k) == "single":
        return transformer.single_transformer_blocks[k - adapter.num_double]
    return transformer.transformer_blocks[k]


def _reference_hook(adapter: DiTAdapter, k: int, n_text: int, store: dict) -> torch.utils.hooks.RemovableHandle:
    """Record the modulated tensor block k itself computes (our own hook, not the adapter's)."""
    block = _block(adapter, k)
    if adapter.spec.family == "flux" and adapter.block_kind(k) == "single":
        return block.norm.register_forward_hook(lambda m, args, out: store.__setitem__(k, out[0][:, n_text:]))
    return block.ff.register_forward_pre_hook(lambda m, args: store.__setitem__(k, args[0]))


def _last_block(adapter: DiTAdapter) -> torch.nn.Module:
    return _block(adapter, adapter.num_blocks - 1)


# ---- the captured tensors are the block's own ------------------------------------------------
def test_modulate_reproduces_block_forward(case):
    adapter, noisy, prompt = case
    ks = list(range(adapter.num_blocks))
    if adapter.spec.family == "flux":
        assert {adapter.block_kind(k) for k in ks} == {"double", "single"}
    reference: dict[int, torch.Tensor] = {}
    handles = [_reference_hook(adapter, k, prompt["prompt_embeds"].shape[0], reference) for k in ks]
    try:
        feats = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks, stop_early=False)
    finally:
        for h in handles:
            h.remove()
    grid = (PIXELS_HW[0] // 16, PIXELS_HW[1] // 16)
    assert sorted(feats) == ks
    for k in ks:
        f = feats[k]
        assert f.pre_adaln.shape == (BATCH, *grid, adapter.spec.hidden_size)
        for v in (f.modulation.shift, f.modulation.scale, f.modulation.gate):
            assert v.shape == (BATCH, adapter.spec.hidden_size) and v.dtype == torch.float32
        ours = modulate(f.pre_adaln.float(), f.modulation.shift, f.modulation.scale)
        theirs = reference[k].float().reshape(ours.shape)
        assert (ours - theirs).abs().max().item() <= 1e-5, (adapter.spec.name, k)


def test_early_exit_is_identical_and_stops(case):
    adapter, noisy, prompt = case
    last = adapter.num_blocks - 1
    ks = [last - 2, last - 1]  # flux: double block 1 and single block 0 (2.. are single)
    fired = []
    handle = _last_block(adapter).register_forward_pre_hook(lambda m, args: fired.append(1))
    try:
        early = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks, stop_early=True)
        assert not fired, "the forward went past the deepest requested block"
        full = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks, stop_early=False)
        assert fired, "the full forward should reach the last block"
    finally:
        handle.remove()
    for k in ks:
        assert torch.equal(early[k].pre_adaln, full[k].pre_adaln)
        for name in ("shift", "scale", "gate"):
            assert torch.equal(getattr(early[k].modulation, name), getattr(full[k].modulation, name))


def test_modulation_without_forward(case):
    adapter, noisy, prompt = case
    ks = list(range(adapter.num_blocks))
    feats = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks, stop_early=False)
    tc = adapter.modulation(prompt, TIMESTEP, ks, "tc")
    for k in ks:
        for name in ("shift", "scale", "gate"):
            ours = getattr(tc[k], name)
            assert ours.shape == (adapter.spec.hidden_size,)
            for b in range(BATCH):
                torch.testing.assert_close(ours, getattr(feats[k].modulation, name)[b], rtol=1e-5, atol=1e-6)
    if adapter.spec.family == "pixart":
        t_only = adapter.modulation(prompt, TIMESTEP, ks, "t")
        for k in ks:
            assert torch.equal(t_only[k].scale, tc[k].scale)
        with pytest.raises(DitfError, match="timestep only"):
            adapter.modulation(prompt, TIMESTEP, ks, "c")
    else:
        for conditioning in ("t", "c"):
            other = adapter.modulation(prompt, TIMESTEP, ks, conditioning)
            for k in ks:
                assert not torch.allclose(other[k].scale, tc[k].scale), (conditioning, k)


def test_saved_pipeline_loads_bit_identical(case, tmp_path):
    adapter, noisy, prompt = case
    folder = adapter.save_pipeline(tmp_path / "pipe")
    assert (folder / "model_index.json").is_file()
    loaded = load_adapter(adapter.spec.name, weights=str(folder), device="cpu")
    noisy2, prompt2 = _inputs(loaded)
    assert prompt2.keys() == prompt.keys()
    for name in prompt:
        assert torch.equal(prompt2[name], prompt[name]), name
    assert torch.equal(noisy2, noisy)
    ks = [0, adapter.spec.default_k]
    a = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks)
    b = loaded.forward_intermediates(noisy2, prompt2, TIMESTEP, ks)
    for k in ks:
        assert torch.equal(a[k].pre_adaln, b[k].pre_adaln)
        assert torch.equal(a[k].modulation.scale, b[k].modulation.scale)
        assert torch.equal(a[k].modulation.shift, b[k].modulation.shift)


def test_bf16_runs_close_to_fp32(case):
    adapter, noisy, prompt = case
    half = load_adapter(adapter.spec.name, dtype="bf16", device="cpu")
    k = adapter.spec.default_k
    ref = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k])[k]
    got = half.forward_intermediates(noisy.to(torch.bfloat16), prompt, TIMESTEP, [k])[k]
    assert got.pre_adaln.dtype == torch.bfloat16
    assert torch.isfinite(got.pre_adaln).all()
    ours = modulate(got.pre_adaln.float(), got.modulation.shift, got.modulation.scale)
    theirs = modulate(ref.pre_adaln, ref.modulation.shift, ref.modulation.scale)
    # measured: ~0.5 % for tiny-sd3 / tiny-pixart, ~5 % for tiny-flux (bf16 rounds its timestep too)
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 0.1, rel.item()


# ---- errors the user can make ---------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_block_index_out_of_range(name):
    adapter = load_adapter(name, device="cpu")
    n = adapter.num_blocks
    for bad in (n, -1):
        with pytest.raises(DitfError, match=rf"0\.\.{n - 1}"):
            adapter.check_indices([0, bad])
    with pytest.raises(DitfError, match=rf"0\.\.{n - 1}"):
        adapter.modulation({}, TIMESTEP, [n])


def test_unknown_model():
    with pytest.raises(DitfError, match="unknown model"):
        load_adapter("not-a-dit")


@pytest.mark.parametrize("name", FAMILIES)
def test_weights_folder_without_model_index(name, tmp_path):
    adapter = load_adapter(name, weights=str(tmp_path), device="cpu")
    with pytest.raises(DitfError, match="model_index.json"):
        adapter.encode_prompts([PROMPT])
    with pytest.raises(DitfError, match="model_index.json"):
        adapter.transformer


def test_registered_specs():
    expected = {
        "sd3": (24, 1536, 9, 340, 960),
        "sd3.5": (38, 2432, 23, 380, 960),
        "pixart-alpha": (28, 1152, 14, 141, 960),
        "flux": (57, 3072, 28, 260, 640),
    }
    for name, values in expected.items():
        spec = get_spec(name)
        assert (spec.num_blocks, spec.hidden_size, spec.default_k, spec.default_t, spec.img_size) == values
    for name in FAMILIES:
        adapter = load_adapter(name, device="cpu")
        config = adapter.transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        assert width == adapter.spec.hidden_size
        assert 0 <= adapter.spec.default_k < adapter.num_blocks


# ---- family specifics -----------------------------------------------------------------------
def test_tiny_sd3_covers_sd35_and_last_block():
    """Block 0 has SD3.5's 9-way dual-attention norm, block 3 the plain 6-way one and is context_pre_only."""
    transformer = load_adapter("tiny-sd3", device="cpu").transformer
    blocks = transformer.transformer_blocks
    d = transformer.inner_dim
    assert blocks[0].attn2 is not None and blocks[0].norm1.linear.out_features == 9 * d
    assert blocks[-1].attn2 is None and blocks[-1].norm1.linear.out_features == 6 * d
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only


def test_sd3_rejects_images_beyond_position_embedding():
    adapter = load_adapter("tiny-sd3", device="cpu")
    prompt = {"prompt_embeds": torch.zeros(4, 64), "pooled_prompt_embeds": torch.zeros(64)}
    too_big = torch.zeros(1, 16, 8, 2 * 33)  # 33 tokens wide, the table covers 32
    with pytest.raises(DitfError, match="too large"):
        adapter.forward_intermediates(too_big, prompt, TIMESTEP, [0])


def test_noise_schedules():
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sd3 = load_adapter("tiny-sd3", device="cpu")
    torch.testing.assert_close(sd3.add_noise(x0, noise, 340), 0.34 * noise + 0.66 * x0)
    pixart = load_adapter("tiny-pixart", device="cpu")
    alpha_bar = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), 0)[141]
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(pixart.add_noise(x0, noise, 141), expected)


def _pixart_with(options_update: dict, config_update: dict) -> DiTAdapter:
    from ditf_pipeline.models.pixart import PixArtAdapter

    spec = get_spec("tiny-pixart")
    config = {**spec.options["tiny_config"], **config_update}
    return PixArtAdapter(dataclasses.replace(spec, options={**spec.options, **options_update, "tiny_config": config}))


def test_pixart_size_conditions():
    """The 1024-px model's path: resolution / aspect-ratio micro-conditions enter adaln_single."""
    adapter = _pixart_with({}, {"use_additional_conditions": True})
    assert adapter.transformer.use_additional_conditions
    noisy, prompt = _inputs(adapter)
    reference: dict[int, torch.Tensor] = {}
    handle = _reference_hook(adapter, 1, 0, reference)
    try:
        feats = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [1], stop_early=False)
    finally:
        handle.remove()
    f = feats[1]
    ours = modulate(f.pre_adaln, f.modulation.shift, f.modulation.scale)
    assert (ours - reference[1].reshape(ours.shape)).abs().max().item() <= 1e-5
    same = adapter.modulation(prompt, TIMESTEP, [1], "tc", image_size=PIXELS_HW)[1]
    torch.testing.assert_close(same.scale, f.modulation.scale[0], rtol=1e-5, atol=1e-6)
    other = adapter.modulation(prompt, TIMESTEP, [1], "tc", image_size=(128, 128))[1]
    assert not torch.allclose(other.scale, f.modulation.scale[0])


def test_pixart_uses_the_prompt_mask():
    """Padding positions of the T5 sequence are masked out of cross-attention."""
    adapter = load_adapter("tiny-pixart", device="cpu")
    noisy, prompt = _inputs(adapter)
    mask = prompt["prompt_attention_mask"]
    assert mask.dtype == torch.float32 and 0 < mask.sum() < mask.numel()
    scrambled = dict(prompt, prompt_embeds=torch.where(mask[:, None] > 0, prompt["prompt_embeds"], 7.0))
    a = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [2])[2].pre_adaln
    b = adapter.forward_intermediates(noisy, scrambled, TIMESTEP, [2])[2].pre_adaln
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unmasked = dict(scrambled, prompt_attention_mask=torch.ones_like(mask))
    c = adapter.forward_intermediates(noisy, unmasked, TIMESTEP, [2])[2].pre_adaln
    assert not torch.allclose(a, c)
