"""Per-call cost of `DiTF.features` without `store=`: in memory, into a fresh temporary store, and
without the model's prompt memory, measured side by side (same machine, same run).

* in memory (what `features()` without `store=` does): nothing is written;
* a fresh temporary store per call (`store=` a new folder each call: what `features()` without
  `store=` did before the in-memory path), prompt memory on;
* a fresh temporary store per call with the prompt memory off: every call loads, runs and frees
  the text encoders (and collects garbage), as each new store needs.

Prints the medians and their ratios to the in-memory one:

    python benchmarks/bench_api_calls.py [--calls 5] [--threads 1] [--out results.json]

The three run interleaved, call by call, so a change of load on a shared machine hits them
alike; `--threads 1` keeps torch's compute from competing with itself there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = {"prompt": "a photo of a bird", "img_size": 64, "ensemble_size": 2}


def _per_call(model, image, calls: int, temporary_store: bool) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        if temporary_store:
            with tempfile.TemporaryDirectory(prefix="bench-api-") as folder:
                model.features(image, store=Path(folder) / "features.zarr", **OPTIONS)
        else:
            model.features(image, **OPTIONS)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    import torch

    from ditf_pipeline import DiTF

    if args.threads:
        torch.set_num_threads(args.threads)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    remembering = DiTF.from_pretrained("tiny-flux", dtype="fp32", device="cpu")
    forgetting = DiTF.from_pretrained("tiny-flux", dtype="fp32", device="cpu")
    forgetting.adapter.prompt_memory = None  # every call encodes the prompt again, as each new store needs
    for model in (remembering, forgetting):  # weights loaded before timing
        model.features(image, prompt="warm-up", img_size=64, ensemble_size=2)
    in_memory, stored, forgotten = [], [], []
    for _ in range(args.calls):  # interleaved, so a change of load on the machine hits all three alike
        in_memory += _per_call(remembering, image, 1, temporary_store=False)
        stored += _per_call(remembering, image, 1, temporary_store=True)
        forgotten += _per_call(forgetting, image, 1, temporary_store=True)
    load = os.getloadavg()
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "model": "tiny-flux fp32 cpu, 64 px, ensemble 2", "calls": args.calls,
        "torch_threads": torch.get_num_threads(),
        "min_s_in_memory": min(in_memory), "min_s_temporary_store": min(stored),
        "min_s_temporary_store_without_prompt_memory": min(forgotten),
        "median_s_in_memory": statistics.median(in_memory),
        "median_s_temporary_store": statistics.median(stored),
        "median_s_temporary_store_without_prompt_memory": statistics.median(forgotten),
    }
    base = result["median_s_in_memory"]
    result["ratio_temporary_store_over_in_memory"] = result["median_s_temporary_store"] / base
    result["ratio_without_prompt_memory_over_in_memory"] = result["median_s_temporary_store_without_prompt_memory"] / base
    print(f"RESULT per call: in memory {base:.3f} s, temporary store {result['median_s_temporary_store']:.3f} s "
          f"({result['ratio_temporary_store_over_in_memory']:.2f}x), temporary store without prompt memory "
          f"{result['median_s_temporary_store_without_prompt_memory']:.3f} s "
          f"({result['ratio_without_prompt_memory_over_in_memory']:.2f}x); load {load[0]:.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
