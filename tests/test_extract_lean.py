"""The lean extract path: compiled blocks, images of one grid batched, the writer thread.

* Compiled blocks (`torch.compile` per block, `aot_eager` here with `fullgraph=True`, so a graph
  break or an exception inside a compiled block fails the test) give the eager features, and
  blocks after the deepest tapped one never run.
* `--batch-images 3` on a folder of mixed aspect ratios and prompts gives the arrays of
  `--batch-images 1`, with forwards that really hold several images.
* A failing store write surfaces as one error on the main thread; the images committed before
  it stay, and a rerun completes to the uninterrupted result (each image committed on its own).
* `--compile` and `--batch-images` are provenance, not the key's config.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import ditf_pipeline.extract.extractor as extractor_module
from ditf_pipeline.extract import ensemble, inputs
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.extract.transfer import HostCopies, upload
from ditf_pipeline.models import load_adapter
from ditf_pipeline.models.base import CompileOptions
from ditf_pipeline.store.feature_store import FeatureArrays, FeatureStore

#: the CPU stand-in for inductor: the same graph capture, no code generation
AOT = CompileOptions(backend="aot_eager", fullgraph=True)
ARRAYS = ("pre_adaln", "grid", "shift", "scale", "gate", "shift_t", "scale_t", "gate_t", "complete")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Seven images in two categories (two prompts), three token grids at --img-size 64."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(96, 72), (72, 96), (96, 72), (80, 80), (96, 72), (72, 96), (96, 72)]
    for i, size in enumerate(sizes):
        category = root / ("cat" if i % 2 else "dog")
        category.mkdir(exist_ok=True)
        small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(category / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def flux():
    return load_adapter("tiny-flux", device="cpu")


def _run(adapter, root, store, **settings):
    base = dict(ks=[1, 3], ts=[260], img_size=64, ensemble_size=2, prompt="template", workers=1)
    extractor = Extractor(adapter, FeatureStore(store), ExtractSettings(**{**base, **settings}))
    return extractor.run(get_dataset("folder", root), progress=False)


def _arrays(store) -> dict:
    group = zarr.open_group(str(store), mode="r")
    return {(k, name): group[f"folder/tiny-flux/k{k}/t260/{name}"][:] for k in (1, 3) for name in ARRAYS}


# ---- compiled blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, channels, ks, n_compiled", [("tiny-flux", 16, [2], 2), ("tiny-sd3", 16, [1, 2], 1),
                                                            ("tiny-pixart", 4, [0, 2], 1)])
def test_compiled_blocks_give_the_eager_features_and_nothing_after_the_deepest_runs(name, channels, ks, n_compiled):
    adapter = load_adapter(name, device="cpu")
    prompts = adapter.encode_prompts(["a photo of a cat", "a photo of a dog"])
    noisy = torch.randn(4, channels, 8, 12, generator=torch.Generator().manual_seed(0))
    eager = adapter.forward_intermediates(noisy, prompts, 260, ks)
    transformer = adapter.transformer
    last = transformer.transformer_blocks[-1] if name != "tiny-flux" else transformer.single_transformer_blocks[-1]
    calls = []
    handle = last.register_forward_pre_hook(lambda *_: calls.append(1))
    adapter.set_compile(AOT)
    try:
        compiled = adapter.forward_intermediates(noisy, prompts, 260, ks)
        assert len(adapter._compiled) == n_compiled  # the untapped blocks before the deepest (flux: both double)
    finally:
        adapter.set_compile(None)
        handle.remove()
    assert calls == []  # the deepest block is ks[-1] < the last block: the cut list never reaches it
    for k in ks:
        torch.testing.assert_close(compiled[k].pre_adaln, eager[k].pre_adaln, rtol=1e-5, atol=1e-5)
        for part in ("shift", "scale", "gate"):
            torch.testing.assert_close(getattr(compiled[k].modulation, part), getattr(eager[k].modulation, part))
    assert type(transformer.transformer_blocks).__name__ == "ModuleList"  # the lists were put back


def test_the_untapped_blocks_run_compiled(flux, monkeypatch):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or real(module, **kw))
    flux.set_compile(AOT)
    try:
        flux.forward_intermediates(torch.randn(2, 16, 8, 8), flux.encode_prompts(["x"])[0], 260, [1, 3])
    finally:
        flux.set_compile(None)
    transformer = flux.transformer
    assert compiled == [transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]]


def test_compile_with_offload_is_refused_before_anything_runs():
    adapter = load_adapter("tiny-flux", device="cpu", offload=True)
    with pytest.raises(DitfError, match="cannot be combined with --offload"):
        extractor_module.check_run(adapter, ExtractSettings(ks=[1], ts=[260], img_size=64, compile="on"))
    assert not extractor_module.compiles(adapter, ExtractSettings(ks=[1], ts=[260], img_size=64))  # auto: off
    with pytest.raises(DitfError, match="unknown --compile"):
        extractor_module.check_settings(ExtractSettings(ks=[1], ts=[260], img_size=64, compile="yes"), 16)
    with pytest.raises(DitfError, match="--batch-images must be at least 1"):
        extractor_module.check_settings(ExtractSettings(ks=[1], ts=[260], img_size=64, batch_images=0), 16)


def test_compiled_extract_equals_eager_and_is_provenance_only(flux, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(extractor_module, "COMPILE", AOT)
    compiled, eager = tmp_path / "compiled.zarr", tmp_path / "eager.zarr"
    _run(flux, folder, compiled, compile="on")
    _run(flux, folder, eager, compile="off")
    a, b = _arrays(compiled), _arrays(eager)
    for name in a:
        np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=1e-3, atol=1e-3)
    keys = zarr.open_group(str(compiled), mode="r")["folder/tiny-flux/k1/t260"].attrs
    assert keys["provenance"]["compile"] == "aot_eager (per block)" and "compile" not in keys["config"]
    # the same key: an eager rerun into the compiled store is accepted and finds everything done
    report = _run(flux, folder, compiled, compile="off")
    assert report.extracted == 0 and report.skipped == 7


# ---- images of one grid batched ------------------------------------------------------------------
def test_batching_images_gives_the_one_at_a_time_arrays(flux, folder, tmp_path, monkeypatch):
    rows = []
    forward = flux.forward_intermediates
    monkeypatch.setattr(flux, "forward_intermediates", lambda noisy, *a, **kw: rows.append(noisy.shape[0]) or forward(noisy, *a, **kw))
    one = _run(flux, folder, tmp_path / "one.zarr", batch_images=1)
    assert rows == [2] * 7
    rows.clear()
    three = _run(flux, folder, tmp_path / "three.zarr", batch_images=3)
    # 4:3 x4 -> 3 + 1, 3:4 x2, 1:1 x1 (ensemble 2 each)
    assert sorted(rows) == [2, 2, 4, 6] and one.extracted == three.extracted == 7
    a, b = _arrays(tmp_path / "one.zarr"), _arrays(tmp_path / "three.zarr")
    for name in a:
        # the DiT's matrix products are not batch-invariant in the last bits on every backend
        np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=1e-3, atol=1e-3,
                                   err_msg=str(name))
    provenance = zarr.open_group(str(tmp_path / "three.zarr"), mode="r")["folder/tiny-flux/k3/t260"].attrs["provenance"]
    assert provenance["batch_images"] == 3 and provenance["compile"] == "off"


@pytest.mark.parametrize("batch", [1, 3])
def test_a_failed_write_is_one_error_and_the_rerun_completes(flux, folder, tmp_path, monkeypatch, batch):
    real = FeatureArrays.write_image
    writes = []

    def failing(self, *args, **kwargs):
        writes.append(1)
        if len(writes) == 5:  # the third image's first key (two keys per image)
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureArrays, "write_image", failing)
    store = tmp_path / "s.zarr"
    with pytest.raises(OSError, match="disk full"):
        _run(flux, folder, store, batch_images=batch)
    assert len(writes) == 5  # nothing written after the failure
    done = zarr.open_group(str(store), mode="r")["folder/tiny-flux/k1/t260/complete"][:]
    assert done.sum() == 2  # the two images before it are committed, each on its own
    monkeypatch.setattr(FeatureArrays, "write_image", real)
    report = _run(flux, folder, store, batch_images=batch)
    assert report.skipped == 2 and report.extracted == 5
    clean = tmp_path / "clean.zarr"
    _run(flux, folder, clean, batch_images=1)
    a, b = _arrays(store), _arrays(clean)
    for name in a:
        np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_non_finite_features_are_refused_by_the_writer(flux, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(ensemble, "_mean", lambda total, count, precision: total * float("nan"))
    with pytest.raises(DitfError, match="non-finite features"):
        _run(flux, folder, tmp_path / "nan.zarr")
    assert not zarr.open_group(str(tmp_path / "nan.zarr"), mode="r")["folder/tiny-flux/k1/t260/complete"][:].any()


# ---- transfers on the CPU --------------------------------------------------------------------------
def test_transfers_are_plain_handovers_on_the_cpu():
    cpu = torch.device("cpu")
    x = torch.arange(6.0).reshape(2, 3)
    assert upload(x, cpu) is x
    copy = HostCopies(cpu).start({"a": x})
    assert copy.done is None
    np.testing.assert_array_equal(copy.wait()["a"], x.numpy())


def test_groups_cut_on_grid_and_size_not_on_how_a_prompt_dict_is_ordered(flux, tmp_path):
    extractor = Extractor(flux, FeatureStore(tmp_path / "g.zarr"),
                          ExtractSettings(ks=[1], ts=[260], img_size=64, batch_images=2))
    cached = {"pooled_prompt_embeds": torch.zeros(32), "prompt_embeds": torch.zeros(4, 32)}  # as the store returns it
    fresh = {"prompt_embeds": torch.zeros(4, 32), "pooled_prompt_embeds": torch.zeros(32)}  # as the encoder does
    wide = torch.zeros(3, 48, 64)
    tall = torch.zeros(3, 64, 48)
    decoded = [(type("R", (), {"key": key})(), pixels)
               for key, pixels in [("a", wide), ("b", wide), ("c", wide), ("d", tall), ("e", wide)]]
    texts = {"a": "x", "b": "y", "c": "y", "d": "x", "e": "x"}
    groups = list(inputs.groups(decoded, texts, {"x": cached, "y": fresh}, extractor.batch_images))
    assert [[record.key for record, _ in group] for group in groups] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_batch_images_default_is_4_on_cuda_unless_memory_is_short():
    from types import SimpleNamespace

    from ditf_pipeline.extract.extractor import batch_images

    settings = ExtractSettings(ks=[1], ts=[260], img_size=64)
    gpu = SimpleNamespace(device=torch.device("cuda"), offload=False)
    assert batch_images(gpu, settings) == 4
    assert batch_images(SimpleNamespace(device=torch.device("cpu"), offload=False), settings) == 1
    assert batch_images(SimpleNamespace(device=torch.device("cuda"), offload=True), settings) == 1
    assert batch_images(gpu, ExtractSettings(ks=[1], ts=[260], img_size=64, batch_size=4)) == 1
    assert batch_images(gpu, ExtractSettings(ks=[1], ts=[260], img_size=64, batch_images=2)) == 2
