"""The score stage: cached predictions + annotations -> benchmark metrics.

Imports neither torch nor the model adapters: scoring runs on a laptop with no DiT and no GPU
(a test checks the import graph).
"""

from __future__ import annotations

from collections.abc import Sequence

from .datasets.base import Dataset
from .errors import DitfError
from .score import pck
from .store import FeatureStore, prediction_scope


def score_pairs(
    store: FeatureStore,
    dataset: Dataset,
    model: str,
    k: int,
    t: int,
    prediction_name: str,
    alphas: Sequence[float] | None = None,
) -> dict:
    """PCK of stored predictions, with the threshold rule of their protocol, as a JSON-ready dict."""
    if dataset.task != "pairs":
        raise DitfError(f"dataset {dataset.name} is a {dataset.task} benchmark, not keypoint pairs")
    pairs = dataset.pairs()
    scope = prediction_scope(dataset.split, [p.pair_id for p in pairs])
    stored = store.open_predictions((dataset.name, model, k, t), prediction_name, scope=scope)
    predictions = stored.read()
    missing = [p.pair_id for p in pairs if p.pair_id not in predictions]
    if missing:
        raise DitfError(
            f"no predictions for {len(missing)} of {len(pairs)} pairs in {prediction_name} (e.g. {missing[0]}): "
            "run `ditf match` first"
        )
    config = stored.config
    protocol = config.get("protocol", prediction_name.split("/")[-1])
    result = pck(
        [predictions[p.pair_id] for p in pairs], pairs, alphas or dataset.alphas, protocol=protocol,
        dataset=dataset.name, model=model, k=k, t=t, variant=config.get("variant", prediction_name.split("/")[0]),
    )
    result["channels"] = config.get("channels", [])
    result["threshold_base"] = dataset.threshold_rule
    return result
