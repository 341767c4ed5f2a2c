"""`ditf doctor`: validate a dataset root and a store without modifying anything."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, DatasetOpt, QuietOpt, SplitOpt, app, user_errors


@app.command()
@user_errors
def doctor(
    dataset: DatasetOpt = "spair",
    data_root: Annotated[Optional[Path], typer.Option(help="Dataset root to check (skipped if not given).")] = None,
    split: SplitOpt = None,
    store: Annotated[Optional[str], typer.Option(help="Store to check, a path or a URL (default stores/ditf.zarr if it exists).")] = None,
    quick: Annotated[bool, typer.Option(help="Read image headers and skip reading every stored chunk.")] = False,
    repair: Annotated[bool, typer.Option(help="Remove half-done setups and unreadable nodes, un-commit damaged "
                                              "images so a rerun redoes only those; never deletes intact data.")] = False,
    migrate: Annotated[bool, typer.Option(help="Convert a store of an older schema in place.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Report what is missing, corrupt or inconsistent in a dataset root and a store (read-only
    unless --repair or --migrate)."""
    from ditf_pipeline.pipeline import check

    store = store if store is not None else (DEFAULT_STORE if Path(DEFAULT_STORE).exists() else None)
    if data_root is None and store is None:
        typer.echo("nothing to check: pass --data-root and/or --store", err=True)
        raise typer.Exit(2)
    findings = check(dataset=dataset, data_root=data_root, split=split, store=store, quick=quick, repair=repair,
                          migrate=migrate)
    for line in findings.ok:
        typer.echo(f"ok       {line}")
    for line in findings.problems:
        typer.echo(f"PROBLEM  {line}")
    for line in findings.repaired:
        typer.echo(f"REPAIRED {line}")
    if repair:
        typer.echo(f"doctor: {len(findings.problems)} problem(s), {findings.resolved} repaired"
                   + ("; rerun the same `ditf extract` / `ditf match` to redo what was removed" if findings.resolved else ""))
    else:
        typer.echo(f"doctor: {len(findings.problems)} problem(s)"
                   + ("; `ditf doctor --repair` fixes what it can" if findings.problems else ""))
    if findings.open_problems > 0:
        raise typer.Exit(1)
