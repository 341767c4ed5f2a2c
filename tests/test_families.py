"""Today's DiT families (issue 26) against diffusers itself, one parametrized case per tiny twin.

The reference is diffusers' own forward of the tiny transformer, fp32, with our forward hooks on
the modules docs/models.md names per family (independent of the adapter's taps): the input of
the block's modulated norm and the modulation that norm applies. ditf's captured z and vectors
must equal what those hooks saw. The twins are also saved as diffusers pipeline folders and
loaded back through `--weights DIR`, where only blocks 0..k may be built or read.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it

from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import adaln_names, modulation_names
from ditf_pipeline.models import get_spec, load_adapter
from ditf_pipeline.models._diffusers import NeverRun
from ditf_pipeline.models.base import DiTAdapter

TIMESTEP = 300
PROMPT = "a photo of a cat"
BATCH = 2


def _grid(z: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return z.reshape(z.shape[0], *hw, z.shape[-1])


def _chunks(out: torch.Tensor, parts: int, take=(3, 4, 5)) -> dict:
    chunks = out.float().chunk(parts, dim=-1)
    return dict(zip(("shift", "scale", "gate"), (chunks[i] for i in take)))


# ---- per family: the modules docs/models.md names, hooked on diffusers' own forward ------------
def _sd3_hooks(transformer, k: int, hw, seen: dict) -> list:
    """SD3 / SD3.5 Medium: z = input of transformer_blocks[k].norm2; vectors = items 3-5 of norm1.linear."""
    block = transformer.transformer_blocks[k]
    parts = block.norm1.linear.out_features // block.norm2.normalized_shape[0]
    return [
        block.norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", _grid(a[0], hw))),
        block.norm1.linear.register_forward_hook(lambda m, a, o: seen.update(_chunks(o, parts))),
    ]


def _table_hooks(transformer, k: int, hw, seen: dict) -> list:
    """PixArt / Sana: z = input of transformer_blocks[k].norm2; vectors = items 3-5 of
    scale_shift_table[None] + the `timestep` (AdaLN-single output) the block receives."""
    block = transformer.transformer_blocks[k]

    def on_block(m, args, kwargs):
        t6 = kwargs["timestep"] if "timestep" in kwargs else args[4]
        table = block.scale_shift_table[None] + t6.reshape(t6.shape[0], 6, -1)
        seen.update(dict(zip(("shift", "scale", "gate"), (table[:, i].float() for i in (3, 4, 5)))))

    return [
        block.norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", _grid(a[0], hw))),
        block.register_forward_pre_hook(on_block, with_kwargs=True),
    ]


def _chroma_hooks(transformer, k: int, hw, seen: dict) -> list:
    """Chroma: double block k: z = input of transformer_blocks[k].norm2, vectors = shift_mlp, scale_mlp,
    gate_mlp as norm1 (ChromaAdaLayerNormZeroPruned) returns them; single block: z = input of
    single_transformer_blocks[i].norm on the image tokens, vectors = the 3-way split of its `emb`,
    the gate checked against what the norm returns."""
    doubles = len(transformer.transformer_blocks)
    if k < doubles:
        block = transformer.transformer_blocks[k]

        def on_norm1(m, args, kwargs, out):
            seen.update(shift=out[2].float(), scale=out[3].float(), gate=out[4].float())

        return [
            block.norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", _grid(a[0], hw))),
            block.norm1.register_forward_hook(on_norm1, with_kwargs=True),
        ]
    norm = transformer.single_transformer_blocks[k - doubles].norm
    n_image = hw[0] * hw[1]

    def on_norm(m, args, kwargs, out):
        seen["z"] = _grid(args[0][:, -n_image:], hw)
        seen.update(_chunks(kwargs["emb"].flatten(1, 2), 3, (0, 1, 2)))
        torch.testing.assert_close(out[1].float(), seen["gate"], rtol=0, atol=0)

    return [norm.register_forward_hook(on_norm, with_kwargs=True)]


def _qwen_image_hooks(transformer, k: int, hw, seen: dict) -> list:
    """Qwen-Image: z = input of transformer_blocks[k].img_norm2; vectors = items 3-5 of img_mod's output."""
    block = transformer.transformer_blocks[k]
    return [
        block.img_norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", _grid(a[0], hw))),
        block.img_mod.register_forward_hook(lambda m, a, o: seen.update(_chunks(o, 6))),
    ]


def _flux2_hooks(transformer, k: int, hw, seen: dict) -> list:
    """Flux.2: z = input of transformer_blocks[k].norm2 (double) or of single_transformer_blocks[i].norm
    on the image tokens; vectors = the MLP-side set of the shared double_stream_modulation_img
    output (items 3-5 of 6) or of single_stream_modulation (items 0-2 of 3)."""
    doubles = len(transformer.transformer_blocks)
    n_image = hw[0] * hw[1]
    if k < doubles:
        return [
            transformer.transformer_blocks[k].norm2.register_forward_pre_hook(
                lambda m, a: seen.__setitem__("z", _grid(a[0], hw))),
            transformer.double_stream_modulation_img.register_forward_hook(lambda m, a, o: seen.update(_chunks(o, 6))),
        ]
    return [
        transformer.single_transformer_blocks[k - doubles].norm.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("z", _grid(a[0][:, -n_image:], hw))),
        transformer.single_stream_modulation.register_forward_hook(lambda m, a, o: seen.update(_chunks(o, 3, (0, 1, 2)))),
    ]


def _lumina2_hooks(transformer, k: int, hw, seen: dict) -> list:
    """Lumina2: z = input of layers[k].ffn_norm1 on the image tokens (after each caption's valid
    tokens); scale, gate = scale_mlp, gate_mlp as layers[k].norm1 returns them; norm_weight =
    layers[k].ffn_norm1.weight; no shift."""
    block = transformer.layers[k]
    n_image = hw[0] * hw[1]

    def on_refined(m, args, kwargs, out):
        seen["start"] = int(args[1].sum(dim=1)[0]) if args[1] is not None else args[0].shape[1]

    def on_ffn_norm(m, args):
        start = seen["start"]
        seen["z"] = _grid(args[0][:, start:start + n_image], hw)
        seen["norm_weight"] = m.weight.float().expand(args[0].shape[0], -1)

    return [
        transformer.context_refiner[0].register_forward_hook(on_refined, with_kwargs=True),
        block.ffn_norm1.register_forward_pre_hook(on_ffn_norm),
        block.norm1.register_forward_hook(lambda m, a, o: seen.update(scale=o[2].float(), gate=o[3].float())),
    ]


def _z_image_hooks(transformer, k: int, hw, seen: dict) -> list:
    """Z-Image: z = input of layers[k].ffn_norm1 on the image tokens (first in [image; caption]);
    scale, gate = items 2, 3 of layers[k].adaLN_modulation's output (one vector for every token
    outside omni mode); norm_weight = layers[k].ffn_norm1.weight; no shift."""
    block = transformer.layers[k]
    n_image = hw[0] * hw[1]

    def on_ffn_norm(m, args):
        seen["z"] = _grid(args[0][:, :n_image], hw)
        seen["norm_weight"] = m.weight.float().expand(args[0].shape[0], -1)

    def on_modulation(m, args, out):
        chunks = out.float().chunk(4, dim=-1)
        seen.update(scale=chunks[2], gate=chunks[3])

    return [block.ffn_norm1.register_forward_pre_hook(on_ffn_norm), block.adaLN_modulation.register_forward_hook(on_modulation)]


#: tiny twin -> (hooks on the named modules, block list attributes in block order)
CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "tiny-sd3.5-medium": (_sd3_hooks, ("transformer_blocks",)),
    "tiny-pixart-sigma": (_table_hooks, ("transformer_blocks",)),
    "tiny-sana": (_table_hooks, ("transformer_blocks",)),
    "tiny-chroma": (_chroma_hooks, ("transformer_blocks", "single_transformer_blocks")),
    "tiny-qwen-image": (_qwen_image_hooks, ("transformer_blocks",)),
    "tiny-flux2": (_flux2_hooks, ("transformer_blocks", "single_transformer_blocks")),
    "tiny-lumina2": (_lumina2_hooks, ("layers",)),
    "tiny-z-image": (_z_image_hooks, ("layers",)),
}
#: tiny twin -> the real model it stands for
REAL = {"tiny-sd3.5-medium": "sd3.5-medium", "tiny-pixart-sigma": "pixart-sigma", "tiny-sana": "sana", "tiny-chroma": "chroma",
        "tiny-qwen-image": "qwen-image", "tiny-flux2": "flux2-dev", "tiny-lumina2": "lumina2",
        "tiny-z-image": "z-image-turbo"}
NAMES = list(CASES)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _inputs(adapter: DiTAdapter) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(0)
    stride = adapter.patch_stride
    pixels = torch.rand(BATCH, 3, 3 * stride, 4 * stride, generator=gen) * 2 - 1  # non-square 3 x 4 tokens
    latents = adapter.encode_images(pixels, torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=gen).to(latents.dtype)
    prompt = adapter.encode_prompts([PROMPT])[0]
    adapter.release_text_encoders()
    return adapter.add_noise(latents, noise, TIMESTEP), prompt


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    adapter = load_adapter(request.param, device="cpu")
    noisy, prompt = _inputs(adapter)
    return request.param, adapter, noisy, prompt


def _hw(adapter: DiTAdapter) -> tuple[int, int]:
    return 3, 4


def _blocks(transformer, attrs) -> list:
    """The real blocks held, in block order (not the placeholders of lists that keep their length)."""
    return [block for attr in attrs for block in getattr(transformer, attr) if not isinstance(block, NeverRun)]


def test_capture_equals_diffusers_forward_hooks(case):
    name, adapter, noisy, prompt = case
    hooks, _ = CASES[name]
    transformer = adapter.transformer
    for k in range(adapter.num_blocks):
        seen: dict = {}
        handles = hooks(transformer, k, _hw(adapter), seen)
        try:
            with torch.no_grad():
                transformer(**adapter._inputs(noisy, prompt, TIMESTEP))
        finally:
            for handle in handles:
                handle.remove()
        ours = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k])[k]
        assert ours.pre_adaln.shape == (BATCH, *_hw(adapter), adapter.architecture.width)
        torch.testing.assert_close(ours.pre_adaln.float(), seen["z"].float(), rtol=1e-6, atol=0)
        vectors = ours.modulation.vectors()
        # what the family's norm applies, and nothing else (an absent shift is absent, not zeros)
        assert set(vectors) == set(seen) - {"z", "start"}
        for part, got in vectors.items():
            assert got.shape == (BATCH, adapter.architecture.width) and got.dtype == torch.float32
            torch.testing.assert_close(got, seen[part], rtol=1e-6, atol=0, msg=f"{name} k={k} {part}")
        tc = adapter.modulation(prompt, TIMESTEP, [k], "tc")[k].vectors()
        assert set(tc) == set(vectors)
        for part, got in tc.items():
            torch.testing.assert_close(got, seen[part][0], rtol=1e-5, atol=1e-6)


def test_conditioning_ablation_or_one_line_error(case):
    name, adapter, noisy, prompt = case
    k = adapter.spec.default_k
    tc = adapter.modulation(prompt, TIMESTEP, [k], "tc")[k]
    if adapter.separates_conditioning:
        for conditioning in ("t", "c"):
            other = adapter.modulation(prompt, TIMESTEP, [k], conditioning)[k]
            assert not torch.allclose(other.scale, tc.scale)
    else:
        with pytest.raises(DitfError, match=adapter.spec.family) as info:
            adapter.modulation(prompt, TIMESTEP, [k], "c")
        assert "\n" not in str(info.value)


def test_blocks_after_k_never_run(case):
    name, adapter, noisy, prompt = case
    _, attrs = CASES[name]
    blocks = _blocks(adapter.transformer, attrs)
    k = adapter.spec.default_k
    fired = []
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: fired.append(i)) for i, block in enumerate(blocks)]
    try:
        adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k])
    finally:
        for handle in handles:
            handle.remove()
    assert fired and max(fired) == k


class _RecordingSafeOpen:
    """`safetensors.safe_open` recording every tensor read from disk."""

    real = safetensors.safe_open
    read: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        self._handle = self.real(*args, **kwargs)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name):
        _RecordingSafeOpen.read.append(name)
        return self._handle.get_tensor(name)

    def __getattr__(self, item):
        return getattr(self._handle, item)


def test_saved_twin_loads_through_weights_truncated(case, tmp_path, monkeypatch):
    name, adapter, noisy, prompt = case
    _, attrs = CASES[name]
    folder = adapter.save_pipeline(tmp_path / "pipe")
    assert (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file()
    k = 1
    monkeypatch.setattr(safetensors, "safe_open", _RecordingSafeOpen)
    _RecordingSafeOpen.read = []
    loaded = load_adapter(name, weights=str(folder), device="cpu")
    assert loaded.architecture == adapter.architecture
    got = loaded.forward_intermediates(noisy, prompt, TIMESTEP, [k])[k]
    assert len(_blocks(loaded.transformer, attrs)) == k + 1
    prefixes = [f"{attr}.{i}." for attr in attrs for i in range(k + 1, 64)]
    assert _RecordingSafeOpen.read and not [n for n in _RecordingSafeOpen.read if n.startswith(tuple(prefixes))]
    want = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k], stop_early=False)[k]  # lists uncut
    assert torch.equal(got.pre_adaln, want.pre_adaln)
    assert got.modulation.vectors().keys() == want.modulation.vectors().keys()
    for part, value in want.modulation.vectors().items():
        assert torch.equal(got.modulation.vectors()[part], value)


def test_registry_entry_states_licence_and_rule():
    for name in NAMES:
        spec, real = get_spec(name), get_spec(REAL[name])
        assert spec.tiny and spec.family == real.family and spec.license
        assert real.hub_id and real.license and not real.tiny
        for entry in (spec, real):
            assert entry.defaults_rule and "not tuned on real weights" in entry.defaults_rule
        assert 0 <= real.default_k < real.num_blocks


def test_store_key_records_the_architecture(case):
    name, adapter, _, _ = case
    config = adapter.architecture.as_config()
    assert config["class"] == adapter.dit_classes()["transformer"].__name__
    assert config["width"] == adapter.architecture.width and config["blocks"]
    # t-only vectors are stored only where the conditioning separates; c-only never without it
    names = modulation_names(adapter)
    assert ("scale_c" in names) == adapter.separates_conditioning and "scale_t" in names
    assert ("shift_t" in names) == (adapter.modulated_norm == "layer")
    assert config.get("norm", "layer") == adapter.modulated_norm
    # a scale-only RMSNorm key stores the norm's weight and no shift at all (absent, never zeros)
    assert ("shift" in adaln_names(adapter)) == ("norm_weight" not in adaln_names(adapter)) == ("norm" not in config)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> Path:
    from ditf_pipeline.demo import make_spair_demo

    return make_spair_demo(tmp_path_factory.mktemp("data") / "SPair", pairs_per_category=1, image_size=(64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_extract_match_score_analyze(name, spair, tmp_path):
    spec = get_spec(name)
    store = tmp_path / "s.zarr"
    common = ["--dataset", "spair", "--data-root", spair, "--store", store, "--model", name,
              "--k", spec.default_k, "--t", spec.default_t]
    result = _cli("extract", *common, "--img-size", "64", "--ensemble-size", "1", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    result = _cli("match", *common, "--no-progress")
    assert result.exit_code == 0, result.output
    result = _cli("score", *common)
    assert result.exit_code == 0 and "pck" in result.output.lower(), result.output
    result = _cli("analyze", *common, "--no-plots", "--out", tmp_path / "analysis")
    assert result.exit_code == 0, result.output


def test_models_lists_families_with_hub_ids_licences_and_twins():
    result = _cli("models")
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.output
    for name in NAMES:
        assert get_spec(REAL[name]).hub_id in result.output
    assert "not tuned on real weights" in result.output and "licence:" in result.output


#: scale-only RMSNorm twins -> the module whose input is the block's modulated MLP-side norm output
MLP_INPUT = {"tiny-lumina2": lambda transformer, k: transformer.layers[k].feed_forward,
             "tiny-z-image": lambda transformer, k: transformer.layers[k].feed_forward}


@pytest.mark.parametrize("name", list(MLP_INPUT))
def test_rms_variant_equals_the_blocks_own_norm_output(name):
    """`adaln` of a stored rms key (z, scale, norm_weight) is exactly what the block feeds its MLP:
    diffusers' ``ffn_norm1(z) * (1 + scale)``, read on the image tokens of diffusers' forward."""
    from ditf_pipeline.match.features import compute_feature
    from ditf_pipeline.match.paper import paper_feature

    adapter = load_adapter(name, device="cpu")
    noisy, prompt = _inputs(adapter)
    k = adapter.spec.default_k
    block = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k])[k]
    assert block.modulation.shift is None and block.modulation.norm_weight is not None
    seen: dict = {}
    handles = CASES[name][0](adapter.transformer, k, _hw(adapter), seen)
    n_image = 3 * 4

    def on_mlp(m, args):
        start = seen.get("start", 0)
        seen["mlp_in"] = args[0][:, start:start + n_image].reshape(BATCH, 3, 4, -1)

    handles.append(MLP_INPUT[name](adapter.transformer, k).register_forward_pre_hook(on_mlp))
    try:
        with torch.no_grad():
            adapter.transformer(**adapter._inputs(noisy, prompt, TIMESTEP))
    finally:
        for handle in handles:
            handle.remove()
    for i in range(BATCH):
        vectors = {name: value[i] for name, value in block.modulation.vectors().items()}
        ours = compute_feature("adaln", block.pre_adaln[i], vectors)
        torch.testing.assert_close(ours, seen["mlp_in"][i].float(), rtol=1e-5, atol=1e-6)
        # the authors' bf16 arithmetic on the same key: the same norm, rounded
        paper = paper_feature("adaln", block.pre_adaln[i], {n: v.numpy() for n, v in vectors.items()})
        torch.testing.assert_close(paper.float(), ours, rtol=0.05, atol=0.05)


def test_rms_keys_support_every_adaln_variant_their_vectors_allow():
    from ditf_pipeline.validate import supported_variants

    rms = adaln_names(load_adapter("tiny-lumina2", device="cpu")) + ["scale_t", "gate_t"]
    assert "shift" not in rms
    assert supported_variants(rms) == ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t"]
