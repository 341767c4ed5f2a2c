"""The match stage as a plan: which blocks of pairs are pending, where their predictions go, and
how a block is predicted in this process or in another one.

Why a plan: the stage has three ways to run the same blocks (in this thread, a pool of worker
processes, dask workers). `predict.plan_match` decides *what* is done, once, with the
store's locks held; an executor (`executors`, `distributed.runners.DaskExecutor`) decides
*where* each block runs, and sees nothing but this plan. So every executor predicts the same
blocks with the same feature cache and matcher, and none of them reaches into `predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.settings import MatchSettings
from ..datasets.base import Pair
from ..store.feature_store import PredictionArrays
from .pool import BlockRunner

#: builds a `BlockRunner` in this process; its argument advances a progress display per pair
LocalRunner = Callable[[Callable[[int], object] | None], BlockRunner]


@dataclass(frozen=True)
class MatchPlan:
    """Everything an executor needs to predict the pending blocks of one predictions group."""

    store_path: str
    feature_key: tuple[str, str, int, int]  # (dataset, model, k, t)
    settings: MatchSettings
    pairs: Sequence[Pair]  # every pair of the dataset, in store order
    rows: dict[str, int]  # image key -> row of the feature arrays
    channels: list[int]  # resolved massive channels (empty when the variant uses none)
    block: int  # pairs per block: one chunk of predictions, committed together
    todo: list[int]  # first pair of every pending block (of this shard), in pair order
    scope: str | None  # predictions scope of the split (`store.prediction_scope`)
    predictions: PredictionArrays  # where this process commits each block
    local_runner: LocalRunner
    #: a picklable callable that builds the `BlockRunner` in a worker process (it opens the store
    #: itself); None when blocks can only run in this process (``--fuse``: the partner's cache)
    worker_runner: Callable[[], BlockRunner] | None

    def block_pairs(self, start: int) -> Sequence[Pair]:
        return self.pairs[start : start + self.block]

    def blocks(self) -> list[tuple[int, Sequence[Pair]]]:
        """(first pair, pairs) of every pending block, in pair order."""
        return [(start, self.block_pairs(start)) for start in self.todo]

    @property
    def n_todo(self) -> int:
        """Pairs in the pending blocks."""
        return sum(len(self.block_pairs(start)) for start in self.todo)

    def rows_of(self, block: Sequence[Pair]) -> dict[str, int]:
        """The rows of the images a block reads (what a remote worker needs to know)."""
        return {key: self.rows[key] for pair in block for key in (pair.src_key, pair.trg_key)}
