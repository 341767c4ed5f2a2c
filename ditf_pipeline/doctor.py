"""`ditf doctor`: check a dataset root and a store, report problems, change nothing.

Runs before a long job (is every image readable, every annotation well formed?) and after a
crash or a copy (is every committed image's data readable, do the keys agree?). It opens the
store read-only and never writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DitfError


@dataclass
class Findings:
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def good(self, line: str) -> None:
        self.ok.append(line)

    def bad(self, line: str) -> None:
        self.problems.append(line)


def check_dataset(name: str, root: Path, split: str | None, findings: Findings, decode: bool = True) -> list[str]:
    """Every image readable, every annotation parsable; returns the image keys."""
    from .datasets import get_dataset
    from .images import image_size, load_rgb

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


def check_store(path: Path, findings: Findings, dataset: str | None = None, keys: list[str] | None = None,
                read_chunks: bool = True) -> None:
    """Schema, keys, and every committed image's chunks readable."""
    from .store import FeatureStore

    try:
        store = FeatureStore(path, read_only=True)
    except DitfError as exc:
        findings.bad(f"store: {exc}")
        return
    found = store.feature_keys(dataset)
    findings.good(f"store {path}: schema ok, {len(found)} feature key(s)")
    for ds, model, k, t in found:
        label = f"{ds}/{model}/k{k}/t{t}"
        try:
            arrays = store.open_features(ds, model, k, t)
            complete = arrays.complete()
            rows = store.image_rows(ds)
        except Exception as exc:  # a damaged node must be reported, not crash the doctor
            findings.bad(f"store: {label}: cannot read ({exc})")
            continue
        if not arrays.config:
            findings.bad(f"store: {label}: no configuration recorded")
        broken = []
        if read_chunks:
            for row in map(int, complete.nonzero()[0]):
                try:
                    arrays.read_image(row)
                except Exception as exc:
                    broken.append(f"row {row} ({exc})")
        for item in broken:
            findings.bad(f"store: {label}: committed image {item} is unreadable")
        line = f"store: {label}: {int(complete.sum())}/{len(complete)} images complete"
        if keys is not None and ds == dataset:
            missing = [key for key in keys if key not in rows or not complete[rows[key]]]
            line += f", {len(missing)} of the dataset's {len(keys)} images not extracted"
        findings.good(line)
        for name, predictions in store.prediction_groups(ds, model, k, t):
            done = predictions.done()
            findings.good(f"store: {label}/predictions/{name}: {int(done.sum())}/{len(done)} pairs done")
