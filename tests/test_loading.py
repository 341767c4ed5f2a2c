"""Loading only what the forward uses, streaming blocks, and the architecture of the loaded weights.

Tiny models are saved as pipeline folders (`save_pipeline`) and loaded back through `--weights`,
so the truncated loader reads real safetensors files. The reference is the tiny model built in
memory, whole, run to the end (`stop_early=False`).
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.models import _REGISTRY, get_spec, load_adapter
from ditf_pipeline.models.base import Architecture
from ditf_pipeline.store.feature_store import FeatureStore

FAMILIES = ["tiny-flux", "tiny-sd3", "tiny-pixart"]
#: blocks checked per family: Flux's last double (1), first single (2) and last (3) blocks
DEPTHS = {"tiny-flux": [0, 1, 2, 3], "tiny-sd3": [0, 2, 3], "tiny-pixart": [1, 3]}
TIMESTEP = 300


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("weights")
    return {name: load_adapter(name, device="cpu").save_pipeline(base / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def references() -> dict:
    """Per family: the whole in-memory model, seeded inputs, and its full-forward features."""
    out = {}
    for name in FAMILIES:
        adapter = load_adapter(name, device="cpu")
        gen = torch.Generator().manual_seed(0)
        pixels = torch.rand(2, 3, 64, 96, generator=gen) * 2 - 1
        latents = adapter.encode_images(pixels, torch.Generator().manual_seed(1))
        noisy = adapter.add_noise(latents, torch.randn(latents.shape, generator=gen), TIMESTEP)
        prompt = adapter.encode_prompts(["a photo of a cat"])[0]
        adapter.release_text_encoders()
        ks = list(range(adapter.num_blocks))
        full = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks, stop_early=False)
        out[name] = (adapter, noisy, prompt, full)
    return out


def _same(a, b) -> None:
    assert torch.equal(a.pre_adaln, b.pre_adaln)
    for part in ("shift", "scale", "gate"):
        assert torch.equal(getattr(a.modulation, part), getattr(b.modulation, part))


def _blocks_held(transformer) -> int:
    return sum(len(getattr(transformer, attr, [])) for attr in ("transformer_blocks", "single_transformer_blocks"))


class _RecordingSafeOpen:
    """`safetensors.safe_open` that records every tensor read from disk."""

    real = safetensors.safe_open
    read: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        self._handle = self.real(*args, **kwargs)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name: str):  # metadata (shape, dtype) only
        return self._handle.get_slice(name)

    def get_tensor(self, name: str):
        _RecordingSafeOpen.read.append(name)
        return self._handle.get_tensor(name)


# ---- 1. only the blocks up to k ------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_truncated_model_gives_the_full_forward_features(name, folders, references, monkeypatch):
    reference, noisy, prompt, full = references[name]
    full_params = sum(p.numel() for p in reference.transformer.parameters())
    # the standalone modulation of a whole model loaded from the same files (a single-row matmul
    # may differ in the last bit between differently aligned copies of the same weights)
    whole = load_adapter(name, weights=str(folders[name]), device="cpu")
    whole.check_indices(range(whole.num_blocks))
    assert _blocks_held(whole.transformer) == whole.num_blocks
    for k in DEPTHS[name]:
        monkeypatch.setattr(safetensors, "safe_open", _RecordingSafeOpen)
        _RecordingSafeOpen.read = []
        adapter = load_adapter(name, weights=str(folders[name]), device="cpu")
        got = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [k])
        _same(got[k], full[k])
        # the conditioning ablation reads the same (kept) blocks
        for conditioning in ("t", "c") if name != "tiny-pixart" else ("t",):
            ours = adapter.modulation(prompt, TIMESTEP, [k], conditioning, image_size=(64, 96))[k]
            theirs = whole.modulation(prompt, TIMESTEP, [k], conditioning, image_size=(64, 96))[k]
            assert torch.equal(ours.shift, theirs.shift) and torch.equal(ours.gate, theirs.gate)
        transformer = adapter.transformer
        assert _blocks_held(transformer) == k + 1
        assert sum(p.numel() for p in transformer.parameters()) < full_params or k == reference.num_blocks - 1
        # block k+1 (and every later one) was never read from disk; blocks 0..k were
        read = set(_RecordingSafeOpen.read)
        assert read == set(transformer.state_dict())
        for later in range(k + 1, adapter.num_blocks):
            prefix = _block_prefix(adapter, later)
            assert not any(n.startswith(prefix) for n in read), (k, prefix)
        assert any(n.startswith(_block_prefix(adapter, k)) for n in read)


def _block_prefix(adapter, k: int) -> str:
    if adapter.block_kind(k) == "single":
        return f"single_transformer_blocks.{k - adapter.num_double}."
    return f"transformer_blocks.{k}."


def test_deeper_request_reloads_and_stays_exact(folders, references):
    reference, noisy, prompt, full = references["tiny-flux"]
    adapter = load_adapter("tiny-flux", weights=str(folders["tiny-flux"]), device="cpu")
    _same(adapter.forward_intermediates(noisy, prompt, TIMESTEP, [0])[0], full[0])
    assert _blocks_held(adapter.transformer) == 1
    got = adapter.forward_intermediates(noisy, prompt, TIMESTEP, [1, 3])
    assert _blocks_held(adapter.transformer) == 4
    _same(got[1], full[1])
    _same(got[3], full[3])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loader_builds_what_diffusers_from_pretrained_builds(name, dtype, folders):
    """Same tensors and buffers (incl. ones not stored, e.g. PixArt's position table), same rounding.

    In bf16 every parameter is bf16; diffusers 0.42.1's `from_pretrained` (without accelerate)
    leaves SD3's parameters in fp32, so values are compared after rounding to ours.
    """
    adapter = load_adapter(name, weights=str(folders[name]), dtype=dtype, device="cpu")
    ours = adapter.transformer
    cls = adapter.dit_classes()["transformer"]
    theirs = cls.from_pretrained(str(folders[name]), subfolder="transformer", dtype=adapter.dtype)
    assert all(p.dtype == adapter.dtype for p in ours.parameters())
    for mine, other in ((ours.state_dict(), theirs.state_dict()), (dict(ours.named_buffers()), dict(theirs.named_buffers()))):
        assert set(mine) == set(other)
        for key in mine:
            assert torch.equal(mine[key], other[key].to(mine[key].dtype)), key
    for key, buffer in theirs.named_buffers():
        assert dict(ours.named_buffers())[key].dtype == buffer.dtype


# ---- 2. offload: one block at a time, same numbers ------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_offload_is_bit_identical_and_streams_one_block(name, references, folders):
    reference, noisy, prompt, full = references[name]
    for weights in (None, str(folders[name])) if name == "tiny-flux" else (None,):
        adapter = load_adapter(name, weights=weights, device="cpu", offload=True)
        ks = list(range(adapter.num_blocks))
        adapter.check_indices(ks)
        transformer, streamer = adapter.transformer, adapter._streamer
        blocks = [b for attr, _, _ in adapter.block_lists for b in getattr(transformer, attr)]
        seen = []

        def count(module, args, block=None):
            seen.append([streamer.on_device(b) for b in blocks])

        handles = [b.register_forward_hook(lambda m, a, o, b=b: count(m, a, b)) for b in blocks]
        got = adapter.forward_intermediates(noisy, prompt, TIMESTEP, ks)
        for handle in handles:
            handle.remove()
        for k in ks:
            _same(got[k], full[k])
        # during each block's forward exactly that block was on the device; none after the forward
        assert len(seen) >= len(blocks) - 1
        assert all(sum(flags) == 1 for flags in seen)
        assert [flags.index(True) for flags in seen] == list(range(len(seen)))
        assert not any(streamer.on_device(b) for b in blocks)
        assert streamer.moves >= len(seen)
        mods = adapter.modulation(prompt, TIMESTEP, ks, "t", image_size=(64, 96))
        expected = reference.modulation(prompt, TIMESTEP, ks, "t", image_size=(64, 96))
        # a one-row CPU matmul may round the last bit differently on a differently aligned copy
        # of the same weights (also seen with diffusers' own from_pretrained), hence the tolerance
        assert all(torch.allclose(mods[k].scale, expected[k].scale, rtol=0, atol=1e-6) for k in ks)


def test_text_encoders_run_on_the_text_device():
    """The DiT device is unusable here (meta): encoding still works, so it only touched text_device."""
    adapter = load_adapter("tiny-flux", device="cpu", text_device="cpu")
    expected = adapter.encode_prompts(["a photo of a cat"])[0]
    adapter.release_text_encoders()
    adapter.device = torch.device("meta")
    got = adapter.encode_prompts(["a photo of a cat"])[0]
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert adapter.text_pipe().text_encoder.device.type == "cpu"


# ---- 3. the architecture comes from the loaded weights -------------------------------------------
@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> Path:
    """A Flux-layout folder wider than tiny-flux (width 64, 3 double + 1 single blocks)."""
    spec = get_spec("tiny-flux")
    config = dict(spec.options["tiny_config"], num_attention_heads=4, num_layers=3, num_single_layers=1)
    adapter = _REGISTRY["tiny-flux"][1](dataclasses.replace(spec, options=dict(spec.options, tiny_config=config)))
    return adapter.save_pipeline(tmp_path_factory.mktemp("wide") / "pipe")


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> Path:
    from ditf_pipeline.demo import make_spair_demo

    return make_spair_demo(tmp_path_factory.mktemp("data") / "SPair", pairs_per_category=1, image_size=(64, 64))


def test_architecture_is_read_from_the_checkpoint(wide_folder):
    for model in ("tiny-flux", "flux"):  # registry: 2+2 blocks d=32, and 19+38 blocks d=3072
        adapter = load_adapter(model, weights=str(wide_folder), device="cpu")
        assert adapter.architecture == Architecture(64, (("double", 3), ("single", 1)), cls="FluxTransformer2DModel")
        assert adapter.num_blocks == 4 and adapter.num_double == 3
        assert [adapter.block_kind(k) for k in range(4)] == ["double"] * 3 + ["single"]
        assert adapter.feature_shape(64, 3)[2] == 64
        assert adapter._transformer is None  # reading the architecture loads no weights


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_narrower_weights_than_the_registry_work_end_to_end(wide_folder, spair, tmp_path):
    """The issue's case: registry width 3072, folder width 64 (was `ValueError: could not broadcast`)."""
    store = tmp_path / "s.zarr"
    common = ["--dataset", "spair", "--data-root", spair, "--store", store, "--model", "flux", "--k", "3", "--t", "260"]
    result = _cli("extract", *common, "--weights", wide_folder, "--img-size", "64", "--ensemble-size", "1",
                  "--dtype", "fp32", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    arrays = FeatureStore(store, read_only=True).open_features("spair", "flux", 3, 260)
    assert arrays.hidden_size == 64
    assert arrays.config["architecture"] == {"width": 64, "blocks": [["double", 3], ["single", 1]],
                                            "class": "FluxTransformer2DModel"}
    assert _cli("match", *common, "--no-progress").exit_code == 0
    result = _cli("score", *common)
    assert result.exit_code == 0, result.output
    assert "pck" in result.output.lower()


def test_weights_that_cannot_serve_are_refused_in_one_line(wide_folder, folders, spair, tmp_path):
    store = tmp_path / "s.zarr"
    base = ["extract", "--dataset", "spair", "--data-root", spair, "--store", store, "--img-size", "64",
            "--ensemble-size", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    cases = [
        (["--model", "flux", "--weights", wide_folder], "block index 28 is out of range for flux from"),
        (["--model", "flux", "--weights", wide_folder, "--k", "4"], "(3 double + 1 single blocks, width 64: blocks 0..3)"),
        (["--model", "tiny-sd3", "--weights", folders["tiny-flux"], "--k", "1"],
         "its transformer is a FluxTransformer2DModel, not the SD3Transformer2DModel"),
    ]
    for args, message in cases:
        result = _cli(*base, *args)
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.output
    assert not store.exists() or not any((store / "spair").glob("*/k*"))


@pytest.mark.slow
def test_keys_of_different_architectures_never_mix(wide_folder, folders, spair, tmp_path):
    store = tmp_path / "s.zarr"
    base = ["extract", "--dataset", "spair", "--data-root", spair, "--store", store, "--model", "tiny-flux", "--k", "1",
            "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert _cli(*base).exit_code == 0
    result = _cli(*base, "--weights", wide_folder)
    assert result.exit_code == 1 and "architecture" in result.output
    arrays = FeatureStore(store, read_only=True).open_features("spair", "tiny-flux", 1, 260)
    assert arrays.hidden_size == 32 and arrays.complete().all()
    assert np.isfinite(arrays.read_image(0)[0]).all()


def test_offload_and_text_device_through_the_cli_store_the_same_features(folders, spair, tmp_path):
    stores = {}
    for name, extra in (("plain", []), ("offload", ["--offload", "--text-device", "cpu", "--batch-size", "1"])):
        stores[name] = tmp_path / f"{name}.zarr"
        result = _cli("extract", "--dataset", "spair", "--data-root", spair, "--store", stores[name], "--model", "tiny-flux",
                      "--weights", folders["tiny-flux"], "--k", "1", "--k", "3", "--img-size", "64", "--ensemble-size", "1",
                      "--dtype", "fp32", "--device", "cpu", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
    for k in (1, 3):
        plain = FeatureStore(stores["plain"], read_only=True).open_features("spair", "tiny-flux", k, 260)
        streamed = FeatureStore(stores["offload"], read_only=True).open_features("spair", "tiny-flux", k, 260)
        assert streamed.group.attrs["provenance"]["offload"] is True
        assert streamed.group.attrs["provenance"]["text_device"] == "cpu"
        for row in range(len(plain.complete())):
            a, b = plain.read_image(row), streamed.read_image(row)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1]["shift"], b[1]["shift"])
