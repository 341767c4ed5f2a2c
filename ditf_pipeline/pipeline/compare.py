"""`ditf compare`: baselines, DiTF and fused rows in one table, like the paper's Table 2."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .commands import DEFAULT_STORE, check_key, run_match, run_score

__all__ = ["PAPER_SPAIR", "CompareRun", "paper_note", "parse_row", "run_compare"]

#: SPair-71k PCK@0.10 per point reported by the DiTF paper (Table 2; docs/reproducing.md), for the footnote
PAPER_SPAIR = {
    ("sd2.1", "raw"): ("DIFT (SD2.1)", 57.7),
    ("dinov2-b14", "raw"): ("DINOv2+NN", 55.6),
    ("flux", "adaln+cd"): ("DiTF-flux", 67.1),
    ("sd3.5", "adaln+cd"): ("DiTF-sd3.5", 64.6),
    ("flux", "fused"): ("DiTF-flux + DINOv2", 67.6),
    ("sd3.5", "fused"): ("DiTF-sd3.5 + DINOv2", 72.2),
}


def parse_row(spec: str) -> tuple[str, int | None, int | None, str | None, str | None]:
    """``MODEL[/kK/tT][:VARIANT[:FUSE]]`` -> (model, k, t, variant, fuse)."""
    from ..core.errors import DitfError
    from ..match.fusion import parse_fuse

    parts = spec.strip().split(":")
    if len(parts) > 3 or not parts[0]:
        raise DitfError(f"--row takes MODEL[/kK/tT][:VARIANT[:FUSE]], got {spec!r}")
    model, k, t = parse_fuse(parts[0])
    variant = parts[1] if len(parts) > 1 and parts[1] else None
    fuse = parts[2] if len(parts) > 2 and parts[2] else None
    return model, k, t, variant, fuse


def paper_note(rows: Sequence[tuple[str, str, str | None]]) -> str:
    """The paper's SPair figures of the (model, variant, fuse) rows shown, as a footnote line."""
    seen = []
    for model, variant, fuse in rows:
        entry = PAPER_SPAIR.get((model, "fused" if fuse else variant))
        if entry and entry not in seen:
            seen.append(entry)
    if not seen:
        return ""
    return "paper, SPair-71k PCK@0.10 per point: " + ", ".join(f"{name} {value}" for name, value in seen) + "\n"


@dataclass
class CompareRun:
    """One score result per row, with the (model, variant, fuse) each row shows."""

    results: list[dict]
    rows: list[tuple[str, str, str | None]]
    dataset: str


def run_compare(
    *,
    rows: Sequence[str] | None,
    dataset: str,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: str | Path = DEFAULT_STORE,
    protocol: str = "dift",
    channels: str = "auto",
    soft_window: int | None = None,
    pca_dim: int | None = None,
    aggregation: str = "per_point",
    alphas: Sequence[float] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
    predictions_store: Path | str | None = None,
) -> CompareRun:
    """Match (once, then from the cache) and score every row; rows default to every model stored.

    Each row goes through `run_match` and `run_score`, so its predictions are the ones `ditf
    match` would write for the same options (into `predictions_store` when the store is a
    published, read-only one).
    """
    from dataclasses import replace

    from ..core.errors import DitfError
    from ..core.naming import DEFAULT_PCA_DIM
    from ..core.settings import MatchSettings
    from ..datasets import get_dataset
    from ..store.feature_store import FeatureStore
    from ..validate import check_alphas, check_choice, check_output_file, check_protocol, check_variants

    check_protocol(protocol)
    check_choice("aggregation", aggregation, ("per_point", "per_image"))
    check_alphas(alphas)
    check_output_file(out)
    specs = [parse_row(spec) for spec in rows or []]
    check_variants([variant for _, _, _, variant, _ in specs if variant])
    data = get_dataset(dataset, data_root, split)
    reader = FeatureStore(store, read_only=True)
    keys = [check_key(reader, data, model, k, t, [variant] if variant else [])
            for model, k, t, variant, _ in specs]
    if rows:
        specs = [(model, kk, tt, variant, fuse) for (model, _, _, variant, fuse), (kk, tt) in zip(specs, keys)]
    else:
        models = sorted({model for _, model, _, _ in reader.feature_keys(data.name)})
        if not models:
            raise DitfError(f"store {store} has no features for {data.name}: run `ditf extract` first")
        specs = [(model, *check_key(reader, data, model, None, None), None, None) for model in models]
    base = MatchSettings(protocol=protocol, channels=channels, soft_window=soft_window,
                         pca_dim=DEFAULT_PCA_DIM if pca_dim is None else pca_dim, device="cpu")
    results, labels = [], []
    for model, k, t, variant, fuse in specs:
        if variant is None:
            has_adaln = bool(reader.open_features(data.name, model, k, t).modulation_names)
            variant = "adaln+cd" if has_adaln else "raw"
        settings = replace(base, variant=variant, fuse=fuse)
        matched = run_match(model=model, dataset=data, store=store, k=k, t=t, variants=[variant], settings=settings,
                            overwrite=overwrite, progress=progress, predictions_store=predictions_store)
        report = matched.reports[0]
        if on_note is not None:
            on_note(f"compare: {model} {settings.label}: {report.done} pair(s) matched, {report.skipped} cached")
        results += run_score(model=model, dataset=data, store=store, k=k, t=t, alphas=alphas,
                             settings=matched.settings, predictions_store=predictions_store).results
        labels.append((model, variant, fuse))
    return CompareRun(results, labels, data.name)
