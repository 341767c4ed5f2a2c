"""`ditf demo`: a generated dataset in a benchmark's real layout, through every stage on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import ModelOpt, ProgressOpt, QuietOpt, app, quiet_note, user_errors


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated dataset and the store.")] = Path("demo_out"),
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Benchmark layout: spair, pfpascal, ap10k, davis, hpatches, ade20k (linear probe).")] = "spair",
    model: ModelOpt = "tiny-flux",
    baseline: Annotated[Optional[str], typer.Option(help="Also extract this model (e.g. tiny-dinov2, tiny-sd) and compare it with the DiTF row (pair benchmarks).")] = None,
    views: Annotated[bool, typer.Option("--views/--no-views", help="spair: also write the analyze/show PNGs, with a k x t PCK grid.")] = True,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Generate a small dataset in a benchmark's real layout and run extract, match and score on a tiny model.

    On pair benchmarks it also prints the ablation table (and a baseline row with --baseline);
    on spair it writes the `ditf analyze` / `ditf show` views; on ade20k it extracts both splits
    and trains and scores the linear probe (`ditf probe`).
    """
    from ditf_pipeline.pipeline import run_demo

    run_demo(out=out, dataset=dataset, model=model, baseline=baseline, views=views, progress=progress and not quiet,
             echo=typer.echo, note=quiet_note(quiet))
