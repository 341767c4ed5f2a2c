"""`ditf doctor`: check a dataset root and a store, report problems, change nothing.

Runs before a long job (is every image readable, every annotation well formed?) and after a
crash or a copy (is every committed image's data readable, do the keys agree?). It opens the
store read-only and never writes, unless asked to `--repair` (or `--migrate`): then it removes
half-done setups and unreadable nodes and un-commits damaged images, never intact committed data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DitfError


@dataclass
class Findings:
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


def check_dataset(name: str, root: Path, split: str | None, findings: Findings, decode: bool = True) -> list[str]:
    """Every image readable, every annotation parsable; returns the image keys."""
    from ..datasets import get_dataset
    from ..extract.images import image_size, load_rgb

    try:
        dataset = get_dataset(name, root, split)
        records = dataset.images()
    except DitfError as exc:
        findings.bad(f"dataset: {exc}")
        return []
    unreadable = 0
    for record in records:
        try:
            load_rgb(record.path) if decode else image_size(record.path)
        except DitfError as exc:
            unreadable += 1
            findings.bad(f"dataset: {exc}")
    findings.good(f"dataset {name} at {root}: {len(records) - unreadable}/{len(records)} images readable")
    if dataset.task == "pairs":
        try:
            pairs = dataset.pairs()
            outside = [
                p.pair_id for p in pairs
                for kps, (w, h) in ((p.src_kps, p.src_size), (p.trg_kps, p.trg_size))
                if len(kps) and ((kps < 0).any() or (kps[:, 0] > w - 1).any() or (kps[:, 1] > h - 1).any())
            ]
            findings.good(f"dataset: {len(pairs)} pairs parsed")
            for pair_id in sorted(set(outside)):
                findings.bad(f"dataset: pair {pair_id} has keypoints outside its image")
        except DitfError as exc:
            findings.bad(f"dataset: {exc}")
    return [r.key for r in records]


def check_store(path: str | Path, findings: Findings, dataset: str | None = None, keys: list[str] | None = None,
                read_chunks: bool = True, repair: bool = False, migrate: bool = False) -> None:
    """Schema, half-done setups, metadata, and every committed image's and block's chunks.

    Read-only unless `repair` (remove half-done setups and unreadable nodes, un-commit damaged
    images and blocks so that a rerun redoes only those) or `migrate` (bring an old schema up
    to date in place); each change is reported as a "repaired" line.
    """
    from .feature_store import FeatureStore, audit_store, repair_root_metadata, store_folder_exists

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
    if migrate:
        findings.fixed(f"migrated {path} to schema {store.schema_version}", resolves=False)
    try:
        ok, problems = audit_store(store, read_chunks=read_chunks)
    except DitfError as exc:
        findings.bad(f"store: {exc}")
        return
    found = store.feature_keys(dataset) if all(p.harmless for p in problems) else []
    findings.good(f"store {path}: schema {store.schema_version}, {len(store.feature_keys())} feature key(s)")
    for line in ok:
        findings.good(line)
    for problem in problems:
        if problem.harmless:
            findings.good(f"{problem.problem} (harmless; --repair removes it)")
            if repair and problem.action is not None:
                problem.action()
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
        for ds, model, k, t in found:
            arrays = store.open_features(ds, model, k, t)
            complete, rows = arrays.complete(), store.image_rows(ds)
            missing = [key for key in keys if key not in rows or not complete[rows[key]]]
            findings.good(f"store: {ds}/{model}/k{k}/t{t}: {len(missing)} of the dataset's {len(keys)} images not extracted")
