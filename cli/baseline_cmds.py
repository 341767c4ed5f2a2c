"""`ditf compare`: baselines, DiTF and fused rows in one table, like the paper's Table 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, AlphaOpt, ChannelsOpt, DataRootOpt, DatasetOpt, OutOpt, OverwriteOpt, PcaOpt, PredictionsStoreOpt,
    ProgressOpt,
    ProtocolOpt, QuietOpt, ReadStoreOpt, SoftWindowOpt, SplitOpt, TableFormatOpt, app, emit, quiet_note, user_errors,
)

RowOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--row", "-r",
        help="One table row: MODEL[/kK/tT][:VARIANT[:FUSE]], e.g. sd2.1:raw, dinov2-b14, flux:adaln+cd, "
        "flux:adaln+cd:dinov2-b14 (fused with DINOv2). VARIANT defaults to raw for models without AdaLN, "
        "else adaln+cd. Repeat for several rows (default: every model stored for the dataset).",
    ),
]



@app.command()
@user_errors
def compare(
    row: RowOpt = None,
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: ReadStoreOpt = DEFAULT_STORE,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    soft_window: SoftWindowOpt = None,
    pca_dim: PcaOpt = 1280,
    aggregation: Annotated[str, typer.Option(help="per_point (paper Table 2) or per_image (Table 3).")] = "per_point",
    alpha: AlphaOpt = None,
    fmt: TableFormatOpt = "table",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Baselines (DIFT on SD2.1, DINOv2+NN), DiTF and DiTF + DINOv2 in one table, from the cache.

    Every row's features must be extracted into the same store first (`ditf extract --model
    dinov2-b14`, `--model sd2.1`, `--model flux`, ...); predictions are computed once and reused
    (on a published, read-only store: into --predictions-store).
    """
    from ditf_pipeline.pipeline import run_compare
    from ditf_pipeline.pipeline.compare import paper_note
    from ditf_pipeline.pipeline.report import check_output_format, render_comparison

    check_output_format(fmt)
    compared = run_compare(rows=row, dataset=dataset, data_root=data_root, split=split, store=store, protocol=protocol,
                           channels=channels, soft_window=soft_window, pca_dim=pca_dim, aggregation=aggregation,
                           alphas=alpha, out=out, overwrite=overwrite, progress=progress and not quiet,
                           on_note=quiet_note(quiet), predictions_store=predictions_store)
    text = render_comparison(compared.results, fmt, aggregation=aggregation)
    if fmt == "table" and compared.dataset == "spair":
        text += paper_note(compared.rows)
    emit(text, out)
