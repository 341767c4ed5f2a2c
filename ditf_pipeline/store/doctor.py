"""`ditf doctor`'s store half: check a store, report problems, change nothing unless asked.

Runs after a crash or a copy (is every committed image's data readable, do the keys agree?). It
opens the store read-only and never writes, unless asked to `--repair` (or `--migrate`): then it
removes half-done setups and unreadable nodes and un-commits damaged images, never intact
committed data. The walk itself is `audit.audit_store`; the dataset half of the command (is
every image readable, every annotation well formed?) is the orchestration layer's, which
combines both (`ditf_pipeline.pipeline.check`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DitfError
from ..core.keys import FeatureKey
from .audit import audit_store, repair_root_metadata
from .backends import is_read_only, store_location
from .backends.locations import read_only_scheme
from .feature_store import FeatureStore, store_folder_exists

__all__ = ["Findings", "check_store"]


@dataclass
class Findings:
    """What a doctor run found: lines that are fine, problems, and what a repair did."""

    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    resolved: int = 0  # problems that a repair fixed

    def fixed(self, line: str, resolves: bool = True) -> None:
        self.repaired.append(line)
        self.resolved += int(resolves)

    @property
    def open_problems(self) -> int:
        return len(self.problems) - self.resolved

    def good(self, line: str) -> None:
        self.ok.append(line)

    def bad(self, line: str) -> None:
        self.problems.append(line)


def check_store(path: str | Path, findings: Findings, dataset: str | None = None, keys: Sequence[str] | None = None,
                read_chunks: bool = True, repair: bool = False, migrate: bool = False) -> None:
    """Schema, half-done setups, metadata, and every committed image's and block's chunks.

    Read-only unless `repair` (remove half-done setups and unreadable nodes, un-commit damaged
    images and blocks so that a rerun redoes only those) or `migrate` (bring an old schema up
    to date in place); each change is reported as a "repaired" line. With `dataset` and its
    image `keys`, also says how many of them each of its keys has not extracted.
    """
    location = store_location(path)
    if (repair or migrate) and is_read_only(location):
        raise DitfError(f"store {location} is read-only ({read_only_scheme(str(location))} serves reads only): "
                        "--repair and --migrate change a store; check it without them")
    if not store_folder_exists(path):
        findings.bad(f"store: store {path} does not exist")
        return
    if repair:
        try:
            fixed = repair_root_metadata(path)
        except OSError as exc:
            findings.bad(f"store: cannot repair {path}: {exc.strerror or exc}")
            return
        if fixed:
            findings.bad(f"store: the root metadata of {path} was damaged")
            findings.fixed(fixed)
    try:
        store = FeatureStore(path, read_only=not (repair or migrate), consolidated=False)  # each node's own metadata
    except DitfError as exc:
        findings.bad(f"store: {exc}")
        return
    try:
        _check(store, findings, dataset, keys, read_chunks, repair, migrate)
    finally:
        store.close()  # a repairing writer ends here (the last one writes the consolidated copy)


def _check(store: FeatureStore, findings: Findings, dataset: str | None, keys: Sequence[str] | None,
           read_chunks: bool, repair: bool, migrate: bool) -> None:
    path = store.path
    if migrate:
        findings.fixed(f"migrated {path} to schema {store.schema_version}", resolves=False)
    try:
        ok, problems = audit_store(store, read_chunks=read_chunks)
    except DitfError as exc:
        findings.bad(f"store: {exc}")
        return
    found = store.layout.feature_keys(dataset) if all(p.harmless for p in problems) else []
    findings.good(f"store {path}: schema {store.schema_version}, {len(store.layout.feature_keys())} feature key(s)")
    for line in ok:
        findings.good(line)
    for problem in problems:
        if problem.harmless:
            findings.good(f"note: {problem.problem} (harmless; the next writer or --repair removes it once its "
                          "writer is gone)")
            if repair and problem.action is not None and problem.action() is not False:
                findings.fixed(problem.repair, resolves=False)
            continue
        findings.bad(problem.problem)
        if repair and problem.action is not None:
            try:
                problem.action()
                findings.fixed(problem.repair)
            except (OSError, DitfError) as exc:
                findings.fixed(f"could not repair: {exc}", resolves=False)
    if keys is not None and dataset is not None:
        _not_extracted(store, found, keys, findings)


def _not_extracted(store: FeatureStore, found: Sequence[FeatureKey], keys: Sequence[str], findings: Findings) -> None:
    """How many of the dataset's images each key has not extracted yet."""
    for key in found:
        arrays = store.open_features(key.dataset, key.model, key.k, key.t)
        complete, rows = arrays.complete(), store.image_rows(key.dataset)
        missing = [name for name in keys if name not in rows or not complete[rows[name]]]
        findings.good(f"store: {key}: {len(missing)} of the dataset's {len(keys)} images not extracted")
