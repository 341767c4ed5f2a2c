"""Pruned vs materialised ``dift`` argmax side by side, on the bench_match workload.

Both `DiftMatcher` methods (``upsample="materialise"``: float32 upsampled score maps;
``upsample="pruned"``: float32 bounds, float64 samples only where the maximum can be) run the
same first N pairs twice each, interleaved (the machine is shared: the second round shows the
noise), on one intra-op thread, CPU-timed; then both are judged against bench_match's float64
referee (float64 source vectors, dots, taps, upsampling and norms).

    python benchmarks/bench_pruned.py [--pairs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_match import Agreement, FeaturePool, build_workload, referee_scores  # noqa: E402

from ditf_pipeline.match.dift import DiftMatcher  # noqa: E402
from ditf_pipeline.match.threads import one_intra_op_thread  # noqa: E402

MODES = ("materialise", "pruned")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    images, pairs = build_workload(0)
    pool = FeaturePool(8)
    work = pairs[: args.pairs]
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "pairs": len(work)}
    predictions = {}
    with one_intra_op_thread():
        for round_ in (1, 2):
            for mode in MODES:
                matcher = DiftMatcher(upsample=mode)
                start = time.process_time()
                predictions[mode] = [
                    matcher.match(pool(p["src"], images[p["src"]]["grid"]), images[p["src"]]["size"],
                                  pool(p["trg"], images[p["trg"]]["grid"]), images[p["trg"]]["size"], p["kps"],
                                  trg_key=images[p["trg"]]["key"])
                    for p in work
                ]
                result[f"{mode}_cpu_ms_per_pair_round{round_}"] = 1000 * (time.process_time() - start) / len(work)
        agreement = {mode: Agreement() for mode in MODES}
        for i, p in enumerate(work):
            s, t = images[p["src"]], images[p["trg"]]
            referee = referee_scores(pool(p["src"], s["grid"]), s["size"], pool(p["trg"], t["grid"]), t["size"], p["kps"])
            for mode in MODES:
                agreement[mode].add(predictions[mode][i], referee, t["size"][0])
    for mode in MODES:
        result[f"{mode}_vs_float64_referee"] = agreement[mode].as_dict()
        print(f"{mode}: {agreement[mode].line()}", file=sys.stderr)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
