"""`ditf compare`: baselines, DiTF and fused rows in one table, like the paper's Table 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE,
    DataRootOpt,
    DatasetOpt,
    PredictionsStoreOpt,
    ProgressOpt,
    SplitOpt,
    StoreOpt,
    app,
    user_errors,
)

#: SPair-71k PCK@0.10 per point reported by the DiTF paper (Table 2; docs/reproducing.md), for the footnote
PAPER_SPAIR = {
    ("sd2.1", "raw"): ("DIFT (SD2.1)", 57.7),
    ("dinov2-b14", "raw"): ("DINOv2+NN", 55.6),
    ("flux", "adaln+cd"): ("DiTF-flux", 67.1),
    ("sd3.5", "adaln+cd"): ("DiTF-sd3.5", 64.6),
    ("flux", "fused"): ("DiTF-flux + DINOv2", 67.6),
    ("sd3.5", "fused"): ("DiTF-sd3.5 + DINOv2", 72.2),
}

RowOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--row", "-r",
        help="One table row: MODEL\\[/kK/tT]\\[:VARIANT\\[:FUSE]], e.g. sd2.1:raw, dinov2-b14, flux:adaln+cd, "
        "flux:adaln+cd:dinov2-b14 (fused with DINOv2). VARIANT defaults to raw for models without AdaLN, "
        "else adaln+cd. Repeat for several rows (default: every model stored for the dataset).",
    ),
]


def parse_row(spec: str) -> tuple[str, int | None, int | None, str | None, str | None]:
    """``MODEL[/kK/tT][:VARIANT[:FUSE]]`` -> (model, k, t, variant, fuse)."""
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.match.fusion import parse_fuse

    parts = spec.strip().split(":")
    if len(parts) > 3 or not parts[0]:
        raise DitfError(f"--row takes MODEL[/kK/tT][:VARIANT[:FUSE]], got {spec!r}")
    model, k, t = parse_fuse(parts[0])
    variant = parts[1] if len(parts) > 1 and parts[1] else None
    fuse = parts[2] if len(parts) > 2 and parts[2] else None
    return model, k, t, variant, fuse


def _paper_note(rows: list[tuple[str, str, str | None]]) -> str:
    seen = []
    for model, variant, fuse in rows:
        entry = PAPER_SPAIR.get((model, "fused" if fuse else variant))
        if entry and entry not in seen:
            seen.append(entry)
    if not seen:
        return ""
    return "paper, SPair-71k PCK@0.10 per point: " + ", ".join(f"{name} {value}" for name, value in seen) + "\n"


@app.command()
@user_errors
def compare(
    row: RowOpt = None,
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    protocol: Annotated[str, typer.Option(help="Matching/scoring protocol: dift or geoaware.")] = "dift",
    channels: Annotated[str, typer.Option(help="Channels to discard for +cd variants: auto, none or e.g. 154,1446.")] = "auto",
    soft_window: Annotated[Optional[int], typer.Option(help="geoaware only: window soft-argmax width (11 or 15).")] = None,
    pca_dim: Annotated[int, typer.Option(help="Fused rows: PCA of the DiT part over each pair to this many dims (0: none).")] = 1280,
    aggregation: Annotated[str, typer.Option(help="per_point (paper Table 2) or per_image (Table 3).")] = "per_point",
    alpha: Annotated[Optional[list[float]], typer.Option("--alpha", help="PCK alpha; repeat for several (default: the dataset's).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv | markdown")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the table to this file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute predictions stored with other settings.")] = False,
    progress: ProgressOpt = True,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Baselines (DIFT on SD2.1, DINOv2+NN), DiTF and DiTF + DINOv2 in one table, from the cache.

    Every row's features must be extracted into the same store first (`ditf extract --model
    dinov2-b14`, `--model sd2.1`, `--model flux`, ...); predictions are computed once and reused
    (on a published, read-only store: into --predictions-store).
    """
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.score.evaluate import score_pairs
    from ditf_pipeline.match.predict import MatchSettings, predict
    from ditf_pipeline.score.report import render_comparison
    from ditf_pipeline.store.feature_store import FeatureStore

    from ditf_pipeline.validate import check_alphas, check_choice, check_output_file, check_protocol, check_variants

    from ditf_pipeline.pipeline import check_key, writing_store

    from .pairs_cmds import _emit

    check_protocol(protocol)
    check_choice("aggregation", aggregation, ("per_point", "per_image"))
    check_alphas(alpha)
    check_output_file(out)
    specs = [parse_row(spec) for spec in row or []]
    check_variants([variant for _, _, _, variant, _ in specs if variant])
    data = get_dataset(dataset, data_root, split)
    checked = FeatureStore(store, read_only=True)
    keys = [check_key(checked, data, model, [k] if k is not None else None, [t] if t is not None else None,
                         [variant] if variant else []) for model, k, t, variant, _ in specs]
    feature_store = writing_store(store, checked, predictions_store)
    if row:
        specs = [(model, kk, tt, variant, fuse) for (model, _, _, variant, fuse), (kk, tt) in zip(specs, keys)]
    else:
        models = sorted({model for _, model, _, _ in feature_store.feature_keys(data.name)})
        if not models:
            raise DitfError(f"store {store} has no features for {data.name}: run `ditf extract` first")
        specs = [(model, None, None, None, None) for model in models]
    results, labels = [], []
    for model, k, t, variant, fuse in specs:
        if k is None or t is None:
            k, t = check_key(feature_store, data, model, None, None)
        if variant is None:
            has_adaln = bool(feature_store.open_features(data.name, model, k, t).modulation_names)
            variant = "adaln+cd" if has_adaln else "raw"
        settings = MatchSettings(variant=variant, protocol=protocol, channels=channels, soft_window=soft_window,
                                 fuse=fuse, pca_dim=pca_dim)
        report = predict(feature_store, data, model, k, t, settings, overwrite=overwrite, progress=progress)
        typer.echo(f"compare: {model} {settings.label}: {report.matched} pair(s) matched, {report.skipped} cached", err=True)
        results.append(score_pairs(feature_store, data, model, k, t, settings.name, alpha))
        labels.append((model, variant, fuse))
    text = render_comparison(results, fmt, aggregation=aggregation)
    if fmt == "table" and data.name == "spair":
        text += _paper_note(labels)
    _emit(text, out)
