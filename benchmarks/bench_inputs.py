"""Timings of the test inputs, kept out of the test suite (a wall-clock assert fails on a loaded machine).

* building each tiny random model (`adapter._tiny()`), target < 1 s;
* generating each demo dataset (`make_demo`), target < 1 s (DAVIS, HPatches < 2 s).

Scoring speed (12,234 pairs, target < 5 s) is measured by `bench_match.py`.

    HF_HUB_OFFLINE=1 python benchmarks/bench_inputs.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from ditf_pipeline.demo import make_demo
    from ditf_pipeline.models import load_adapter

    results: dict[str, dict[str, float]] = {"tiny_model_build_s": {}, "demo_generation_s": {}}
    for name in ("tiny-flux", "tiny-sd3", "tiny-pixart"):
        adapter = load_adapter(name, device="cpu")
        results["tiny_model_build_s"][name] = round(_seconds(adapter._tiny), 3)
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in ("spair", "pfpascal", "ap10k", "davis", "hpatches"):
            results["demo_generation_s"][dataset] = round(_seconds(lambda: make_demo(dataset, Path(tmp) / dataset)), 3)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
