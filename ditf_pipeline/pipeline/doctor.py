"""`ditf doctor`: the dataset check and the store audit, combined."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ["check", "check_dataset"]

if TYPE_CHECKING:
    from ..store.doctor import Findings


def check_dataset(name: str, root: Path, split: str | None, findings: Findings, decode: bool = True) -> list[str]:
    """Every image readable, every annotation parsable; returns the image keys."""
    from ..core.errors import DitfError
    from ..datasets import get_dataset
    from ..core.images import image_size, load_rgb

    try:
        dataset = get_dataset(name, root, split)
        records = dataset.images()
    except DitfError as exc:
        findings.bad(f"dataset: {exc}")
        return []
    unreadable = 0
    for record in records:
        try:
            orientation = {"exif_transpose": dataset.exif_transpose}
            load_rgb(record.path, **orientation) if decode else image_size(record.path, **orientation)
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


def check(*, dataset: str = "spair", data_root: Path | None = None, split: str | None = None,
          store: str | Path | None = None, quick: bool = False, repair: bool = False,
          migrate: bool = False) -> Findings:
    """Check a dataset root and/or a store; change the store only to `repair` or `migrate`.

    With both, the store is also asked how many of the dataset's images each of its keys has
    not extracted. `quick` reads image headers only and skips reading every stored chunk.
    """
    from ..datasets import get_dataset
    from ..store.doctor import Findings, check_store

    findings = Findings()
    keys = None
    if data_root is not None:
        keys = check_dataset(dataset, data_root, split, findings, decode=not quick)
    if store is not None:
        name = None
        if data_root is not None:
            try:
                name = get_dataset(dataset, data_root, split).name
            except Exception:
                name = dataset
        check_store(store, findings, name, keys, read_chunks=not quick, repair=repair, migrate=migrate)
    return findings
