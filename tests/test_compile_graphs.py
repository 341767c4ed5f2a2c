"""Compiled graphs over a mixed-aspect run: at most 2 per block kind (dynamic batch and token
dimensions marked; every block input contiguous), counted per block kind as the benchmark reports it.

SPair-like input: 4 aspect ratios, groups of one token grid batched 4 images per forward with
partial groups (batch sizes 4, 3, 2, 1), a deepest tap in the single blocks of tiny-flux.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

import ditf_pipeline.extract.extractor as extractor_module
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.models import load_adapter
from ditf_pipeline.models.base import CompileOptions
from ditf_pipeline.models.compiled import compiled_graphs, reset_compiled_graphs
from ditf_pipeline.store.feature_store import FeatureStore

#: SPair's four common aspect ratios (W, H), and how many images of each (partial groups of 4)
ASPECTS = {(500, 375): 5, (375, 500): 3, (500, 333): 2, (333, 500): 1}


@pytest.fixture(scope="module")
def spair_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspects")
    rng = np.random.default_rng(0)
    i = 0
    for (w, h), count in ASPECTS.items():
        for _ in range(count):
            category = root / ("cat" if i % 2 else "dog")
            category.mkdir(exist_ok=True)
            small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
            Image.fromarray(small).resize((w // 5, h // 5), Image.BILINEAR).save(category / f"img{i}.png")
            i += 1
    return root


@pytest.mark.slow  # dynamo traces each graph: ~50 s on one core
def test_a_mixed_aspect_run_compiles_at_most_two_graphs_per_block_kind(spair_like, tmp_path, monkeypatch):
    torch._dynamo.reset()
    reset_compiled_graphs()
    monkeypatch.setattr(extractor_module, "COMPILE", CompileOptions(backend="eager"))
    adapter = load_adapter("tiny-flux", device="cpu")
    settings = ExtractSettings(ks=[3], ts=[260], img_size=96, ensemble_size=2, prompt="template", workers=1,
                               compile="on", batch_images=4)
    try:
        report = Extractor(adapter, FeatureStore(tmp_path / "s.zarr"), settings).run(
            get_dataset("folder", spair_like), progress=False)
    finally:
        adapter.set_compile(None)
    assert report.extracted == sum(ASPECTS.values())
    graphs = compiled_graphs()
    # tiny-flux: 2 double blocks, 2 single blocks; k=3 taps the second single block, so the
    # double blocks and the first single block run compiled
    assert set(graphs) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}, graphs
    assert all(1 <= n <= 2 for n in graphs.values()), graphs
