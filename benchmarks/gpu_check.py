"""Everything a GPU can show about ditf, measured in one run of at most 9 minutes (`gpu_check.sh`).

Steps, each a benchmark of its own in a subprocess with its own time limit (a step that fails
or runs out of time is recorded and the next one runs):

1. device paths (`device_paths.py`): every former CUDA-only crash point of the match stage on
   cuda against the CPU (paper precision, --fuse, geoaware, DAVIS, HPatches, batched dift);
2. match (`bench_match.py --device cuda --quick --no-referee`): the fast matcher on the GPU
   after a warm-up against the CPU on the same pairs (agreement, ms per pair), GPU searches;
3. extraction (`extract_gpu.py --models flux`): ditf eager and lean (compiled, 4 images per
   forward) on SPair aspect ratios, >= 32 timed images, prompts encoded before any clock;
   the authors'-style baseline (cudnn.benchmark); the FLOP floor from the matmul rate measured
   in the same run; compile seconds and compiled graphs per block kind; seconds outside the
   image loop; peak GPU memory of ditf's cut model at 1 and 4 images per forward.

Everything goes to one folder, `benchmarks/results/gpu/<date>-<device>/` by default:
``summary.json`` (device name, the headline figures, each step's status), each step's JSON
and ``log.txt``. `--dry-run` runs the same steps on the CPU with tiny models, the GPU side on
the stand-in device of `ditf_pipeline.fake_cuda` (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: seconds per step on a GPU (the sum stays under 9 minutes with the start-up of each)
LIMITS = {"device_paths": 60, "match": 120, "extract": 330}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def device_name(dry_run: bool) -> str:
    if dry_run:
        return "dry-run-cpu"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA GPU here; use --dry-run for the CPU rehearsal")
    return torch.cuda.get_device_name(0)


def steps(out: Path, dry_run: bool, images: int) -> dict[str, list[str]]:
    python = sys.executable
    fake = ["--fake-cuda"] if dry_run else []
    extract = ["--tiny", "--images", str(images), "--batch-images", "2", "--compile-backend", "eager"] if dry_run \
        else ["--images", str(images)]
    return {
        "device_paths": [python, str(HERE / "device_paths.py"), "--json", str(out / "device_paths.json"), *fake,
                         *(["--tiny"] if dry_run else [])],
        "match": [python, str(HERE / "bench_match.py"), "--device", "cuda", "--no-referee",
                  "--smoke" if dry_run else "--quick", "--json", str(out / "match.json"), *fake],
        "extract": [python, str(HERE / "extract_gpu.py"), "--models", "flux", "--out", str(out), *extract,
                    *(["--device", "cpu"] if dry_run else [])],
    }


def run_step(name: str, command: list[str], limit: float, log) -> dict:
    log.write(f"\n===== {name}: {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - start
    print(f"gpu_check: {name}: {status} in {seconds:.0f} s", file=sys.stderr)
    return {"status": status, "seconds": round(seconds, 1), "command": " ".join(Path(c).name if "/" in c else c for c in command)}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def headline(out: Path) -> dict:
    """The figures the README quotes, gathered from the steps' JSON (None where a step failed)."""
    figures: dict = {}
    paths = _read(out / "device_paths.json")
    if paths:
        figures["former_crash_points"] = {name: ("ran" if row["ran"] else row["error"]) for name, row in paths["paths"].items()}
        figures["device_paths_agreement"] = {name: row.get("agree") for name, row in paths["paths"].items()}
    match = _read(out / "match.json")
    if match and isinstance(match.get("gpu"), dict):
        gpu = match["gpu"]
        figures["match_cuda_ms_per_pair"] = gpu.get("fast_batched_ms_per_pair")
        figures["match_cpu_ms_per_pair"] = match.get("fast_cpu_ms_per_pair")
        figures["match_cuda_vs_cpu_keypoints_identical"] = gpu.get("cuda_vs_cpu_keypoints_identical")
    extract = next(iter(sorted(out.glob("extract_gpu-*.json"))), None)
    data = _read(extract) if extract else None
    if data and "flux" in data.get("models", {}):
        flux = data["models"]["flux"]
        figures["matmul_tflops"] = data.get("matmul_ceiling_tflops")
        figures["extract_img_per_s"] = {run: flux[run]["images_per_s"] for run in ("ours", "lean", "baseline") if run in flux}
        figures["extract_floor_img_per_s"] = 1 / flux["floor_seconds_per_image"]
        figures["compile_seconds"] = flux["lean"].get("compile_seconds")
        figures["compiled_graphs"] = flux["lean"].get("compiled_graphs_warm_up")
        figures["compiled_graphs_in_timed_run"] = flux["lean"].get("compiled_graphs_timed_run")
        figures["seconds_outside_image_loop"] = {run: flux[run].get("seconds_outside_image_loop") for run in ("ours", "lean")}
        figures["peak_gpu_gib_cut_model"] = {"1_image_per_forward": flux["ours"].get("peak_gpu_gib"),
                                             "4_images_per_forward": flux["lean"].get("peak_gpu_gib")}
        figures["timed_images"] = flux["ours"]["images"]
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny models (the suite runs it)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/gpu/<date>-<device>)")
    parser.add_argument("--images", type=int, default=None, help="timed extraction images (default 32; --dry-run 2)")
    args = parser.parse_args(argv)
    name = device_name(args.dry_run)
    date = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / "gpu" / f"{date}-{_slug(name)}"
    out.mkdir(parents=True, exist_ok=True)
    images = args.images or (2 if args.dry_run else 32)
    scale = 10 if args.dry_run else 1  # the CPU rehearsal is slower than the GPU it stands for
    summary: dict = {"device": name, "date": date, "dry_run": args.dry_run, "steps": {}}
    env_start = time.perf_counter()
    with open(out / "log.txt", "w", encoding="utf-8") as log:
        for step, command in steps(out, args.dry_run, images).items():
            summary["steps"][step] = run_step(step, command, LIMITS[step] * scale, log)
    summary["seconds"] = round(time.perf_counter() - env_start, 1)
    summary["figures"] = headline(out)
    import torch

    summary["torch"] = torch.__version__
    summary["cuda"] = torch.version.cuda
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"gpu_check: results in {out}", file=sys.stderr)
    return 0 if all(row["status"] == "ok" for row in summary["steps"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
