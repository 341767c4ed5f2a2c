"""`FeatureKey`: the one place where a feature key's path in the store is formatted and parsed.

A key is what one extraction run computes: features of one dataset by one model at block k and
timestep t, stored under ``<dataset>/<model>/k<k>/t<t>``. Commands, the store's walker, the
audit and the explorer all go through this value instead of building or splitting the string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DitfError

_PATH = re.compile(r"(?P<dataset>[^/]+)/(?P<model>[^/]+)/k(?P<k>\d+)/t(?P<t>\d+)")


@dataclass(frozen=True, order=True)
class FeatureKey:
    """One cached (dataset, model, k, t): its fields, its store path and its short label."""

    dataset: str
    model: str
    k: int
    t: int

    @property
    def path(self) -> str:
        """The key's group in the store: ``<dataset>/<model>/k<k>/t<t>``."""
        return f"{self.dataset}/{self.model}/k{self.k}/t{self.t}"

    @property
    def block_step(self) -> str:
        """``k<k>/t<t>``: how lists of the keys of one (dataset, model) name them."""
        return f"k{self.k}/t{self.t}"

    def __str__(self) -> str:
        return self.path

    @classmethod
    def parse(cls, path: str) -> FeatureKey:
        """The key stored at `path` (``<dataset>/<model>/k<k>/t<t>``, surrounding slashes ignored).

        Raises
        ------
        DitfError
            When `path` is not a key path.
        """
        match = _PATH.fullmatch(path.strip("/"))
        if match is None:
            raise DitfError(f"{path!r} is not a feature key path (expected <dataset>/<model>/k<K>/t<T>)")
        return cls(match["dataset"], match["model"], int(match["k"]), int(match["t"]))

    @classmethod
    def is_key_path(cls, path: str) -> bool:
        """Whether `path` names a feature key (without raising)."""
        return _PATH.fullmatch(path.strip("/")) is not None
