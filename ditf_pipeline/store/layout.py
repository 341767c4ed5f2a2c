"""The store's layout, written once: the names of its nodes and the one walker over them.

::

    <store>/                                   attrs: ditf_schema_version
      <dataset>/images/{key, size}             the image index (attrs: count)
      <dataset>/<model>/k<k>/t<t>/             a feature key (`core.keys.FeatureKey`), or only its
                                               predictions (attrs: predictions_of, `--predictions-store`)
          predictions/<scope>/<variant>/<protocol>/   scope = <split>-<digest of the pair ids>
          predictions/<variant>/<protocol>/    (schema 1: one pair list, unscoped)
      prompts/<model>-<digest>/<text digest>/  one encoded prompt
      .ditf/{locks,staging,trash}/             ditf's bookkeeping: no zarr.json, so no zarr node

The walker (`StoreLayout`) lists folders through the backend, not through zarr, so it finds
what zarr cannot open (half-done setups, damaged metadata): the store, `ditf doctor`'s audit,
`ditf export` and the explorer's listing all walk the store through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..core.keys import FeatureKey
from .backend_interface import ReadBackend

__all__ = ["IMAGES", "LOCKS", "META", "PREDICTIONS", "PREDICTIONS_OF", "PROMPTS", "STAGING", "TRASH", "StoreLayout", "lock_path",
           "node_kind", "prediction_scope"]

#: ditf's bookkeeping inside the store (locks, staging, trash): no zarr.json, so zarr skips it
META = ".ditf"
LOCKS = f"{META}/locks"
STAGING = f"{META}/staging"
TRASH = f"{META}/trash"
PROMPTS = "prompts"
IMAGES = "images"
PREDICTIONS = "predictions"
#: attribute of a key group that holds only predictions, of the features of another (published) store
PREDICTIONS_OF = "predictions_of"
#: the arrays of a predictions group (never a level of the walk)
_PREDICTION_ARRAYS = ("c", "pair_id", "pred", "done")


def lock_path(node: str) -> str:
    """The lock file (or, on object storage, the lease) guarding writes to `node`."""
    return f"{LOCKS}/{node.strip('/').replace('/', '%')}.lock"


def prediction_scope(split: str | None, pair_ids: Sequence[str]) -> str:
    """Name of the predictions of one pair list: ``<split>-<digest of the pair ids>``.

    Keyed by split and pair list, the predictions of every split of a benchmark (and of a
    changed pair list) live side by side in one store instead of refusing each other.
    """
    digest = hashlib.sha256("\n".join(map(str, pair_ids)).encode()).hexdigest()[:8]
    return f"{split or 'default'}-{digest}"


def node_kind(parts: Sequence[str]) -> str:
    """What a node path inside the store is: root, index, key, predictions, prompt, or intermediate."""
    if not parts:
        return "root"
    if parts[0] == PROMPTS:
        return "prompt" if len(parts) >= 2 else "intermediate"
    if len(parts) >= 2 and parts[1] == IMAGES:
        return "index"
    if len(parts) >= 5 and parts[4] == PREDICTIONS:
        return "predictions" if len(parts) >= 7 else "intermediate"
    if len(parts) >= 4:
        return "key"
    return "intermediate"


class StoreLayout:
    """The one walk over a store's nodes, as folders of its backend."""

    def __init__(self, backend: ReadBackend) -> None:
        self.backend = backend

    def datasets(self) -> list[str]:
        """Every dataset folder that is a zarr node (the root's children but prompts and `.ditf`)."""
        return [name for name in self.backend.list("") if name not in (META, PROMPTS)
                and self.backend.exists(f"{name}/zarr.json")]

    def key_folders(self, dataset: str | None = None) -> list[FeatureKey]:
        """Every ``<dataset>/<model>/k<k>/t<t>`` folder, set up completely or not."""
        found = []
        for ds in self.datasets():
            if dataset is not None and ds != dataset:
                continue
            for model in self.backend.list(ds):
                for k_name in self.backend.list(f"{ds}/{model}"):
                    for t_name in self.backend.list(f"{ds}/{model}/{k_name}"):
                        path = f"{ds}/{model}/{k_name}/{t_name}"
                        if FeatureKey.is_key_path(path) and self.backend.is_dir(path):
                            found.append(FeatureKey.parse(path))
        return sorted(found)

    def feature_keys(self, dataset: str | None = None) -> list[FeatureKey]:
        """The keys that hold features: their commit array (`complete`) exists."""
        return [key for key in self.key_folders(dataset) if self.backend.exists(f"{key.path}/complete/zarr.json")]

    def prediction_folders(self, key: FeatureKey) -> list[str]:
        """Every predictions group folder of `key` (scoped, or schema 1's unscoped), set up or not."""
        base = f"{key.path}/{PREDICTIONS}"
        found = []
        for first in self.backend.list(base):
            for second in self.backend.list(f"{base}/{first}"):
                folder = f"{base}/{first}/{second}"
                if second in _PREDICTION_ARRAYS:
                    continue
                if self.backend.exists(f"{folder}/done"):  # schema 1: <variant>/<protocol>
                    found.append(folder)
                    continue
                found += [f"{folder}/{third}" for third in self.backend.list(folder)
                          if third not in _PREDICTION_ARRAYS and self.backend.is_dir(f"{folder}/{third}")]
        return found

    def prompt_entries(self) -> list[str]:
        """Every ``prompts/<cache>/<entry>`` folder."""
        return [f"{PROMPTS}/{cache}/{entry}" for cache in self.backend.list(PROMPTS)
                for entry in self.backend.list(f"{PROMPTS}/{cache}") if self.backend.is_dir(f"{PROMPTS}/{cache}/{entry}")]

    def staging(self) -> list[str]:
        """Folders of setups under way (or left by a killed writer)."""
        return [f"{STAGING}/{name}" for name in self.backend.list(STAGING)]

    def nodes(self) -> list[str]:
        """Every zarr node (group or array) of the store, "" for the root; chunk folders and `.ditf` left out."""
        return [node for node in self.backend.metadata_nodes()
                if node.split("/")[0] != META and "c" not in node.split("/")]
