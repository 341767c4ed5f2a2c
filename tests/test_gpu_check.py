"""`benchmarks/gpu_check.sh --dry-run`: the GPU check's every step on the CPU with tiny models,
its GPU side on the stand-in device of `ditf_pipeline.fake_cuda`, into one results folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # three benchmarks end to end (~1 CPU-minute)
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert result.returncode == 0, result.stderr[-3000:] + log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "dry-run-cpu" and summary["dry_run"]
    assert {name: row["status"] for name, row in summary["steps"].items()} == {
        "device_paths": "ok", "match": "ok", "extract": "ok"}
    figures = summary["figures"]
    assert set(figures["former_crash_points"].values()) == {"ran"}
    assert {"paper_precision", "fuse", "geoaware", "davis_propagation", "hpatches"} <= set(figures["former_crash_points"])
    assert figures["match_cuda_vs_cpu_keypoints_identical"] == 1.0 and figures["match_cuda_ms_per_pair"] > 0
    assert set(figures["extract_img_per_s"]) == {"ours", "lean", "baseline"} and figures["extract_floor_img_per_s"] > 0
    assert figures["matmul_tflops"] > 0 and figures["compile_seconds"] is not None
    assert 1 <= max(figures["compiled_graphs"].values()) <= 2 and not figures["compiled_graphs_in_timed_run"]
    assert set(figures["seconds_outside_image_loop"]) == {"ours", "lean"}
    assert set(figures["peak_gpu_gib_cut_model"]) == {"1_image_per_forward", "4_images_per_forward"}
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.json", "device_paths.json", "match.json", "log.txt"} <= names
    assert any(n.startswith("extract_gpu-") and n.endswith(".json") for n in names)
    assert len(names) <= 8  # what a device machine hands back from one folder
