"""`ditf demo --dataset X` and `ditf run --dataset X` end to end for every benchmark layout."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo import make_demo

pytestmark = pytest.mark.slow  # end-to-end: runs whole commands/scripts/clusters (`-m "not slow"` skips them)


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.mark.parametrize("dataset", ["pfpascal", "ap10k", "davis", "hpatches"])
def test_run_on_each_benchmark_demo(tmp_path, dataset):
    root = make_demo(dataset, tmp_path / "data")
    out = tmp_path / "result.json"
    _invoke("run", "--model", "tiny-flux", "--dataset", dataset, "--data-root", root, "--store", tmp_path / "s.zarr",
            "--img-size", "64", "--ensemble-size", "1", "--no-progress", "--format", "json", "--out", out)
    [result] = json.loads(out.read_text())
    assert result["dataset"] == dataset and result["model"] == "tiny-flux"
    if dataset in ("pfpascal", "ap10k"):
        alphas = {"pfpascal": {"0.05", "0.1", "0.15"}, "ap10k": {"0.01", "0.05", "0.1"}}[dataset]
        assert set(result["pck"]) == alphas and result["n_pairs"] > 0
    elif dataset == "davis":
        assert 0 <= result["global"]["J&F-Mean"] <= 100 and len(result["per_sequence"]) == 2
        assert result["results_dir"].endswith("adaln+cd/video")
    else:
        assert set(result["accuracy"]) == {"overall", "illumination", "viewpoint"}
        assert result["accuracy"]["overall"]["n"] == result["n_pairs"] > 0
    # the second run reuses the cache for every stage
    again = _invoke("run", "--model", "tiny-flux", "--dataset", dataset, "--data-root", root, "--store",
                    tmp_path / "s.zarr", "--img-size", "64", "--ensemble-size", "1", "--no-progress")
    assert "0 image(s) extracted" in again and "0 " in again.split("match:")[1]


def test_davis_defaults_and_prompt_text(tmp_path):
    """DAVIS: ensemble 1 and DiTF's literal prompt by default; the run marker records the variant."""
    root = make_demo("davis", tmp_path / "data")
    _invoke("extract", "--model", "tiny-flux", "--dataset", "davis", "--data-root", root, "--store", tmp_path / "s.zarr",
            "--img-size", "64", "--no-progress")
    import zarr

    config = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["davis/tiny-flux/k2/t260"].attrs["config"]
    assert config["ensemble_size"] == 1 and config["prompt"] == "text:a photo of a image"
    assert config["resample"] == "cv2-bilinear" and config["vae_dtype"] == "float32"  # eval_davis.py's read_frame
    # the same key under the other resampler or precision is refused, not silently reused
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--dataset", "davis", "--data-root", str(root),
                                      "--store", str(tmp_path / "s.zarr"), "--img-size", "64", "--no-progress",
                                      "--resample", "pil-bicubic"])
    assert result.exit_code == 1 and "resample" in result.output
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--dataset", "davis", "--data-root", str(root),
                                      "--store", str(tmp_path / "s.zarr"), "--precision", "paper", "--dtype", "fp32"])
    assert result.exit_code == 1 and "--precision paper runs the DiT in bf16" in result.output


def test_demo_with_baseline_row(tmp_path):
    output = _invoke("demo", "--out", tmp_path, "--baseline", "tiny-dinov2", "--no-views", "--no-progress")
    assert "ablation and baseline" in output
    assert "tiny-dinov2" in output.split("ablation and baseline")[1]
