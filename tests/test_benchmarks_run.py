"""The benchmark scripts still run (in their CI-sized modes) and print their result lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: runs whole commands/scripts/clusters (`-m "not slow"` skips them)

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 240) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_extract_gpu_tiny(tmp_path):
    out = _run("benchmarks/extract_gpu.py", "--tiny", "--out", str(tmp_path))
    assert "RESULT device=" in out and "matmul ceiling" in out
    assert "RESULT flux ours:" in out and "fraction of floor" in out
    assert "RESULT flux baseline (authors' style):" in out and "ours/baseline =" in out
    assert "RESULT sd3.5 ours:" in out
    # the lean rows (compiled blocks, 4 images per forward) next to the eager one-image row
    assert "RESULT flux lean (compile aot_eager, 4 images/forward):" in out and "lean/baseline =" in out
    assert "RESULT sd3.5 lean" in out and "lean/ours =" in out
    # the analytic FLOP count of the early-exited Flux forward equals torch's flop counter
    ratio = float(out.split("flops analytic/counted = ")[1].split()[0])
    assert ratio == pytest.approx(1.0, abs=1e-3)
    # the authors' baseline runs block 28 in full and the final layer (no early exit), plus the
    # float32 VAE on every ensemble copy: more FLOPs per image than ours
    ours = float(out.split("RESULT flux ours:")[1].split("TFLOP/image")[0].split(";")[-1])
    baseline_dit = float(out.split("final layer ")[1].split(",")[0])
    assert baseline_dit > ours and "fp32 VAE x2" in out
    assert len(list(tmp_path.glob("extract_gpu-*.json"))) == 1 and len(list(tmp_path.glob("extract_gpu-*.md"))) == 1


def test_bench_extract_runs():
    out = _run("benchmarks/bench_extract.py", "--images", "3", "--ensemble-size", "2")
    assert "img/s" in out and "model=tiny-flux" in out
    out = _run("benchmarks/bench_extract.py", "--images", "2", "--ensemble-size", "2", "--compile", "on",
               "--compile-backend", "aot_eager", "--batch-images", "2")
    assert "compile=on/aot_eager batch_images=2: 2 images" in out


def test_bench_match_smoke():
    out = _run("benchmarks/bench_match.py", "--smoke")
    assert "fast dift matcher:" in out and "speed ratio naive / fast" in out and "geoaware matcher" in out
    assert "fast vs float64 referee, every pair:" in out and "naive vs referee on the sample:" in out
    assert "referee_vs_float64_full vs referee on the sample: 6/6" in out  # the referee's identity holds in float64


@pytest.mark.slow
def test_bench_predict_runs(tmp_path):
    out = _run("benchmarks/bench_predict.py", "--scale", "0.03", "--variants", "raw", "--jobs", "1,2", "--ceiling",
               "--json", str(tmp_path / "p.json"))
    assert "raw            jobs=2 (1 worker(s)):" in out and "speed-up 1 -> 2 jobs" in out  # 367 pairs: too few for workers
    assert "ceiling (two independent halves)" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert sum(h["pairs"] for h in result["two_independent_halves"]["raw"]["halves"]) == result["pairs"]


def test_bench_predict_process_mode_against_a_baseline(tmp_path):
    """`--process`: the whole `ditf match` as a child, start-up subtracted, a baseline checkout
    (here this very tree) run side by side and its predictions compared."""
    out = _run("benchmarks/bench_predict.py", "--process", "--scale", "0.01", "--variants", "raw", "--jobs", "1",
               "--baseline", str(ROOT), "--json", str(tmp_path / "p.json"))
    assert "baseline raw        jobs=1:" in out and "this     raw        jobs=1:" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert [run["code"] for run in result["runs"]] == ["baseline", "this"]
    for run in result["runs"]:
        assert run["predictions_equal_first_run"] and run["pairs"] == result["pairs"]
        assert run["cpu_s"] > run["startup_cpu_s"] > 0 and run["peak_rss_mib"] > 0


def test_bench_api_calls(tmp_path):
    out = _run("benchmarks/bench_api_calls.py", "--calls", "1", "--out", str(tmp_path / "r.json"))
    assert "RESULT per call: in memory" in out and "temporary store without prompt memory" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["calls"] == 1 and result["median_s_in_memory"] > 0
    assert result["ratio_temporary_store_over_in_memory"] > 0 and result["ratio_without_prompt_memory_over_in_memory"] > 0


def test_bench_published_small():
    out = _run("benchmarks/bench_published.py", "--images", "2", "--repeats", "1")
    assert "RESULT open: 1 request(s)" in out and "RESULT http:" in out and "x local" in out


def test_bench_pruned_smoke(tmp_path):
    out = _run("benchmarks/bench_pruned.py", "--pairs", "3", "--json", str(tmp_path / "r.json"))
    result = json.loads(out)
    assert result["pruned_vs_float64_referee"]["keypoints"] == result["materialise_vs_float64_referee"]["keypoints"] > 0
