"""`ditf doctor` finds damage in a dataset and a store, and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.models import load_adapter
from ditf_pipeline.store.feature_store import FeatureStore


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _doctor(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ditf_cli.main", "doctor", *args], capture_output=True, text=True, env=env)


def test_doctor_reports_corrupt_chunk_image_and_annotation_without_writing(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=2)
    store_path = tmp_path / "s.zarr"
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    Extractor(load_adapter("tiny-flux", device="cpu"), FeatureStore(store_path), settings).run(
        get_dataset("spair", root, "test"), progress=False
    )
    healthy = _doctor("--data-root", str(root), "--store", str(store_path))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "0 problem(s)" in healthy.stdout

    chunk = sorted((store_path / "spair" / "tiny-flux" / "k1" / "t260" / "pre_adaln" / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][0]
    chunk.write_bytes(b"garbage")
    image = sorted((root / "JPEGImages").rglob("*.jpg"))[-1]
    image.write_bytes(image.read_bytes()[:300])
    before_store, before_data = _tree(store_path), _tree(root)
    sick = _doctor("--data-root", str(root), "--store", str(store_path))
    assert sick.returncode == 1
    problems = [line for line in sick.stdout.splitlines() if line.startswith("PROBLEM")]
    assert any("unreadable" in line and "spair/tiny-flux/k1/t260" in line for line in problems), sick.stdout
    assert any(image.name in line for line in problems), sick.stdout
    assert _tree(store_path) == before_store and _tree(root) == before_data


def test_doctor_on_missing_store_is_one_problem(tmp_path):
    result = _doctor("--store", str(tmp_path / "nope.zarr"))
    assert result.returncode == 1 and "does not exist" in result.stdout
    assert not (tmp_path / "nope.zarr").exists()
