"""Per-call cost of `DiTF.features` without `store=`, with and without the model's prompt memory.

Each call without `store=` writes a temporary store. Without the prompt memory every call loads,
runs and frees the text encoders (and collects garbage); with it they run once per model object.
Prints both medians side by side and their ratio (same machine, same run):

    python benchmarks/bench_api_calls.py [--calls 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _per_call(model, image, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        model.features(image, prompt="a photo of a bird", img_size=64, ensemble_size=2)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    from ditf_pipeline import DiTF

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    remembering = DiTF.from_pretrained("tiny-flux", dtype="fp32", device="cpu")
    forgetting = DiTF.from_pretrained("tiny-flux", dtype="fp32", device="cpu")
    forgetting.adapter.prompt_memory = None  # every call encodes the prompt again, as each new store needs
    for model in (remembering, forgetting):  # weights loaded before timing
        model.features(image, prompt="warm-up", img_size=64, ensemble_size=2)
    with_memory = _per_call(remembering, image, args.calls)
    without = _per_call(forgetting, image, args.calls)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
        "model": "tiny-flux fp32 cpu, 64 px, ensemble 2, no store=", "calls": args.calls,
        "median_s_with_prompt_memory": statistics.median(with_memory),
        "median_s_without_prompt_memory": statistics.median(without),
    }
    result["ratio_without_over_with"] = result["median_s_without_prompt_memory"] / result["median_s_with_prompt_memory"]
    print(f"RESULT per call: with prompt memory {result['median_s_with_prompt_memory']:.3f} s, without "
          f"{result['median_s_without_prompt_memory']:.3f} s, without/with = {result['ratio_without_over_with']:.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
