"""`--precision paper` against the default on the tiny-flux SPair demo: PCK and feature differences.

    python benchmarks/compare_precision.py [--out benchmarks/results/precision-tiny-flux-demo.json]

Three stores from one generated demo dataset (the `ditf demo` settings: 128 px, ensemble 2,
tiny-flux's k and t): "default-fp32" (the CPU default), "default-bf16" (the GPU default: bf16
DiT, fp32 ensemble mean and matching) and "paper" (bf16 DiT, bf16 means, bf16 variant, fp16
upsampling and cosine). For each: PCK@0.1 of `adaln+cd` under the dift protocol; between
paper and each default: the largest |difference| of the stored z and of the matching feature,
and the share of keypoints predicted at the same pixel. Random tiny weights: the figures show
how far the arithmetic moves numbers, not DiTF's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_demo  # noqa: E402
from ditf_pipeline.score.evaluate import score_pairs  # noqa: E402
from ditf_pipeline.extract.extractor import Extractor, default_settings  # noqa: E402
from ditf_pipeline.match.features import compute_feature  # noqa: E402
from ditf_pipeline.models import get_spec, load_adapter  # noqa: E402
from ditf_pipeline.match.paper import paper_feature  # noqa: E402
from ditf_pipeline.match.predict import MatchSettings, predict  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

RUNS = {"default-fp32": ("fp32", "default"), "default-bf16": ("bf16", "default"), "paper": ("bf16", "paper")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = get_spec(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo("spair", Path(tmp) / "data", overwrite=True)
        dataset = get_dataset("spair", root)
        rows, features, predictions, scores = {}, {}, {}, {}
        for name, (dtype, precision) in RUNS.items():
            store = FeatureStore(Path(tmp) / f"{name}.zarr")
            settings = default_settings(spec, dataset, img_size=128, ensemble_size=2, precision=precision)
            k, t = settings.ks[0], settings.ts[0]
            Extractor(load_adapter(args.model, dtype=dtype, device="cpu"), store, settings).run(dataset, progress=False)
            report = predict(store, dataset, args.model, k, t, MatchSettings(variant="adaln+cd"), progress=False)
            arrays = store.open_features(dataset.name, args.model, k, t)
            rows = store.image_rows(dataset.name)
            compute = paper_feature if precision == "paper" else compute_feature
            features[name] = {}
            for key, row in rows.items():
                z, modulation = arrays.read_image(row)
                feature = compute("adaln+cd", z, modulation, report.channels)
                features[name][key] = (np.asarray(z, dtype=np.float32), feature.float().numpy())
            predictions[name] = store.open_predictions((dataset.name, args.model, k, t), "adaln+cd/dift").read()
            result = score_pairs(store, dataset, args.model, k, t, "adaln+cd/dift")
            scores[name] = {"per_point": result["pck"]["0.1"]["per_point"]["all"],
                            "per_image": result["pck"]["0.1"]["per_image"]["all"], "channels": report.channels}
        comparisons = {}
        for other in ("default-fp32", "default-bf16"):
            z_diff = max(float(np.abs(features["paper"][key][0] - features[other][key][0]).max()) for key in rows)
            f_diff = max(float(np.abs(features["paper"][key][1] - features[other][key][1]).max()) for key in rows)
            same = [np.all(predictions["paper"][p] == predictions[other][p], axis=-1) for p in predictions["paper"]]
            same = np.concatenate(same)
            comparisons[f"paper vs {other}"] = {
                "max_abs_z_difference": z_diff, "max_abs_feature_difference": f_diff,
                "same_prediction_share": float(same.mean()), "keypoints": int(same.size),
            }
    out = {"model": args.model, "dataset": "spair demo (ditf demo generator, 128 px, ensemble 2, adaln+cd, dift)",
           "machine": "2-core CPU, no GPU", "pck@0.1": scores, "comparisons": comparisons}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
