"""Features from one store, predictions in another: matching a published (read-only) cache.

A published store (https://, hf://) cannot take predictions, yet `ditf match` on it is how
someone without a GPU produces new predictions from features computed elsewhere. `PairedStore`
reads features, the image index and everything else from the published store and sends the
predictions (and files that accompany them, e.g. DAVIS masks) to a local store named by
`--predictions-store`; `ditf score` given the same two stores reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .feature_store import FeatureStore

__all__ = ["PairedStore"]


class PairedStore:
    """A `FeatureStore` look-alike: predictions go to `predictions`, all else is read from `features`."""

    def __init__(self, features: FeatureStore, predictions: FeatureStore) -> None:
        self.features = features
        self.predictions = predictions

    def __getattr__(self, name: str) -> Any:
        return getattr(self.features, name)

    def open_predictions(self, feature_key: tuple[str, str, int, int], name: str,
                         pair_ids: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Predictions of the predictions store (see `FeatureStore.open_predictions`); a writer
        first marks the key's group there as predictions of the features store."""
        if pair_ids is not None:
            self.predictions.hold_predictions_of(feature_key, str(self.features.path))
        return self.predictions.open_predictions(feature_key, name, pair_ids, *args, **kwargs)

    def predictions_lock(self, *args: Any, **kwargs: Any) -> Any:
        """The lock of a predictions group is taken where the group is written."""
        return self.predictions.predictions_lock(*args, **kwargs)

    def prediction_groups(self, *args: Any, **kwargs: Any) -> Any:
        """Every predictions group of a key in the predictions store."""
        return self.predictions.prediction_groups(*args, **kwargs)

    def results_dir(self, feature_key: tuple[str, str, int, int], name: str) -> Path:
        """Files that accompany predictions live beside the predictions store."""
        return self.predictions.results_dir(feature_key, name)

    def close(self) -> bool:
        """Close the predictions store (the features store is read-only: nothing to close)."""
        return self.predictions.close()

    def __enter__(self) -> PairedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
