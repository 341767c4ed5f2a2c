"""The score stage: cached predictions + annotations -> benchmark metrics.

Imports neither torch nor the model adapters: scoring runs on a laptop with no DiT and no GPU
(a test checks the import graph).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..datasets.base import Dataset
from ..core.errors import DitfError
from .pck import pck, per_pair_rows
from ..store.feature_store import FeatureStore, prediction_scope


def result_context(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, prediction_name: str,
                   prediction_config: dict | None = None) -> dict:
    """What a score was computed from, recorded with it so a JSON or CSV file explains itself:
    dataset and split, the store, the feature extraction settings and the prediction settings."""
    features = store.open_features(dataset.name, model, k, t).config
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "model": model,
        "k": k,
        "t": t,
        "store": str(store.path),
        "prediction": prediction_name,
        "features": features,
        "prediction_config": prediction_config or {},
    }


def _stored_pairs(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, prediction_name: str):
    if dataset.task != "pairs":
        raise DitfError(f"dataset {dataset.name} is a {dataset.task} benchmark, not keypoint pairs")
    dataset.check_annotations()  # what extract refuses is never scored
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
    return stored.config, [predictions[p.pair_id] for p in pairs], pairs


def per_pair(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, prediction_name: str,
             alphas: Sequence[float] | None = None) -> list[dict]:
    """`score.per_pair_rows` of stored predictions, each row with model, k, t, variant and protocol."""
    config, predictions, pairs = _stored_pairs(store, dataset, model, k, t, prediction_name)
    protocol = config.get("protocol", prediction_name.split("/")[-1])
    head = {"dataset": dataset.name, "split": dataset.split, "model": model, "k": k, "t": t,
            "variant": config.get("variant", prediction_name.split("/")[0]), "protocol": protocol}
    return [{**head, **row} for row in per_pair_rows(predictions, pairs, alphas or dataset.alphas, protocol=protocol)]


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
    config, predictions, pairs = _stored_pairs(store, dataset, model, k, t, prediction_name)
    protocol = config.get("protocol", prediction_name.split("/")[-1])
    result = pck(
        predictions, pairs, alphas or dataset.alphas, protocol=protocol,
        dataset=dataset.name, model=model, k=k, t=t, variant=config.get("variant", prediction_name.split("/")[0]),
    )
    result["channels"] = config.get("channels", [])
    result["threshold_base"] = dataset.threshold_rule
    context = result_context(store, dataset, model, k, t, prediction_name, config)
    return {**{key: context[key] for key in ("dataset", "split")}, **result,
            **{key: value for key, value in context.items() if key not in result}}
