"""The Python API (`DiTF`, `open_store`), `ditf export` and `ditf --version` (the examples in README.md and
`docs/` run in `tests/test_docs.py`).

The API is the command line's own path: features extracted through `DiTF.features` must equal,
bit for bit, those `ditf extract` caches, for every variant.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline import DiTF, open_store
from ditf_pipeline.api import image_key
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.features import variant_names

SETTINGS = {"img_size": 64, "ensemble_size": 2}
CLI_SETTINGS = ["--img-size", "64", "--ensemble-size", "2", "--dtype", "fp32", "--no-progress"]


def _image(seed: int, size=(80, 64)) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(_image(0)).save(folder / "cat.png")
    Image.fromarray(_image(1, (64, 96))).save(folder / "dog.png")
    return folder


@pytest.fixture(scope="module")
def model() -> DiTF:
    return DiTF.from_pretrained("tiny-flux")


@pytest.fixture(scope="module")
def cli_store(images, tmp_path_factory) -> Path:
    """`ditf extract` of the folder at two blocks."""
    store = tmp_path_factory.mktemp("cli") / "ditf.zarr"
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--dataset", "folder", "--data-root", str(images),
                                      "--store", str(store), "--k", "1", "--k", "2", "--t", "260", *CLI_SETTINGS])
    assert result.exit_code == 0, result.output
    return store


def test_api_equals_cli_for_every_variant(model, images, cli_store, tmp_path):
    # the first call extracts into the API's store, the others read it back (images already complete)
    stored = open_store(cli_store)
    for variant in variant_names():
        ours = model.features([images / "cat.png", images / "dog.png"], k=[1, 2], t=260, variant=variant,
                              store=tmp_path / "api.zarr", keys=["cat", "dog"], **SETTINGS)
        assert sorted(ours) == [(1, 260), (2, 260)]
        for (k, t), maps in ours.items():
            for key, feature in zip(["cat", "dog"], maps):
                cli = stored.features("folder", "tiny-flux", k, t, variant=variant, image=key)
                assert feature.dtype == torch.float32 and feature.ndim == 3
                assert torch.equal(feature, cli), (variant, k, key)


def test_one_k_t_gives_a_list_and_image_kinds_agree(model, images):
    pixels = _image(0)
    as_numpy, as_pil, as_tensor, as_float = model.features(
        [pixels, Image.fromarray(pixels), torch.from_numpy(pixels.copy()).permute(2, 0, 1), pixels / 255.0], **SETTINGS
    )
    assert as_numpy.shape[0] == 32  # tiny-flux width, (C, h, w)
    assert torch.equal(as_numpy, as_pil) and torch.equal(as_numpy, as_tensor) and torch.equal(as_numpy, as_float)
    with pytest.raises(DitfError, match="image"):
        model.features([np.zeros((4, 4, 2), dtype=np.uint8)])
    with pytest.raises(DitfError, match="does not exist"):
        model.features([images / "missing.png"])


def test_store_is_filled_and_reused(model, images, tmp_path):
    store = tmp_path / "cache.zarr"
    first = model.features(images / "cat.png", store=store, variant="raw", **SETTINGS)
    key = image_key(images / "cat.png")
    assert open_store(store).images("folder") == [key]
    second = model.features(images / "cat.png", store=store, variant="raw", **SETTINGS)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[0], open_store(store).features("folder", "tiny-flux", variant="raw", image=key))


def test_match_follows_the_dift_rule(model, images):
    from ditf_pipeline.match.matchers import make_matcher

    points = model.match(images / "cat.png", images / "dog.png", [(10, 20), (70, 5)], **SETTINGS)
    src, trg = model.features([images / "cat.png", images / "dog.png"], **SETTINGS)
    expected = make_matcher("dift").match(src.permute(1, 2, 0), (80, 64), trg.permute(1, 2, 0), (64, 96),
                                          np.array([[10.0, 20.0], [70.0, 5.0]]))
    assert points.shape == (2, 2) and np.array_equal(points, expected)


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_export_one_file_per_image(cli_store, tmp_path, fmt):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", "tiny-flux", "--dataset", "folder", "--store", str(cli_store),
                                      "--k", "2", "--variant", "adaln+cd", "--file-format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.suffix == f".{fmt}") == [f"cat.{fmt}", f"dog.{fmt}"]
    expected = open_store(cli_store).features("folder", "tiny-flux", 2, 260, variant="adaln+cd", image="dog")
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out / "dog.safetensors"), "pt") as handle:
            tensor, meta = handle.get_tensor("features"), {k: json.loads(v) for k, v in handle.metadata().items()}
    else:
        tensor = torch.from_numpy(np.load(out / "dog.npy"))
        meta = json.loads((out / "dog.json").read_text())
    assert torch.equal(tensor, expected)
    assert meta["grid"] == list(expected.shape[1:]) and meta["variant"] == "adaln+cd"
    assert (meta["model"], meta["k"], meta["t"], meta["image"]) == ("tiny-flux", 2, 260, "dog")
    assert meta["extract"]["ensemble_size"] == 2


def test_export_refuses_bad_input(cli_store, tmp_path):
    result = CliRunner().invoke(app, ["export", "--model", "tiny-flux", "--dataset", "folder", "--store", str(cli_store),
                                      "--k", "2", "--file-format", "pickle", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "error: unknown export format" in result.output
    assert not (tmp_path / "x").exists()


def test_light_import_and_version():
    code = "import sys, ditf_pipeline; assert ditf_pipeline.__all__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == "ditf 0.1.0"


def _imports(module: str) -> set[str]:
    """Absolute names a module imports (anywhere in it), found by AST (layout-agnostic: by module name)."""
    import importlib.util

    path = Path(importlib.util.find_spec(module).origin)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_layering():
    """Walls the API relies on: the CLI's command files are siblings, matching owns its LayerNorm."""
    assert not any("pairs_cmds" in name for name in _imports("ditf_cli.extract_cmds"))
    assert not any("extract_cmds" in name for name in _imports("ditf_cli.pairs_cmds"))
    assert not any(name.startswith("ditf_pipeline.match.predict") for name in _imports("ditf_pipeline.match.fusion"))
    for module in ("ditf_pipeline.match.features", "ditf_pipeline.match.matchers", "ditf_pipeline.match.predict", "ditf_pipeline.match.fusion",
                   "ditf_pipeline.pipeline.stages", "ditf_pipeline.score.pck"):
        assert not any(name.startswith("ditf_pipeline.models") for name in _imports(module)), module


@pytest.mark.slow
def test_no_dependency_warnings(images, tmp_path):
    """A clean run prints nothing from transformers/diffusers (their loggers are quieted at the source)."""
    code = ("from ditf_pipeline import DiTF; "
            f"DiTF.from_pretrained('tiny-flux').features({str(images / 'cat.png')!r}, img_size=32, ensemble_size=1)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
