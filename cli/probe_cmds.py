"""`ditf probe`: linear-probe semantic segmentation (ADE20K, paper Table 6) from cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import DataRootOpt, DatasetOpt, KOpt, ModelOpt, ProgressOpt, QuietOpt, TOpt, app, quiet_note, user_errors

ProbeStoreOpt = Annotated[
    list[str] | None,
    typer.Option("--store", "-s", help="Feature store (a path or a URL); repeat for several image scales (one store per --img-size "
                 "used at extract; the first is the training scale)."),
]


@app.command()
@user_errors
def probe(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "ade20k",
    data_root: DataRootOpt = Path("data/ADEChallengeData2016"),
    store: ProbeStoreOpt = None,
    k: KOpt = None,
    t: TOpt = None,
    variant: Annotated[str, typer.Option("--variant", "-v", help="raw | adaln | adaln-t | adaln-c (no channel "
                                         "discard for segmentation; models without AdaLN: raw).")] = "adaln",
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 30,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate (linear warmup, then poly decay to 0).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps (default min(1500, 5% of all)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the head initialisation and the per-epoch shuffles.")] = 0,
    train_label_side: Annotated[int | None, typer.Option(help="Train the loss on labels nearest-resized to this long "
                                                            "side (default: full label size).")] = None,
    train_split: Annotated[str, typer.Option(help="Split the head is trained on.")] = "training",
    val_split: Annotated[str, typer.Option(help="Split mIoU is reported on.")] = "validation",
    ms_average: Annotated[str, typer.Option(help="Multi-scale fusion: softmax (mmseg aug_test) or logits.")] = "softmax",
    out: Annotated[Path | None, typer.Option(help="Folder for head.safetensors, head.json and the checkpoint "
                                                "(default: <store>.probe/<dataset>-<model>-k<k>-t<t>-<variant>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out (settings must match).")] = True,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch end).")] = 200,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    workers: Annotated[int, typer.Option(help="Threads reading features and labels ahead.")] = 2,
    per_class: Annotated[bool, typer.Option(help="Also print the per-class IoU table.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="Format of the printed result: table | json.")] = "table",
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Train a linear head (BatchNorm + 1x1) on cached features and report mIoU (DINOv2 linear protocol).

    Features stream from the store (the DiT never runs). Extract both splits first, e.g.
    `ditf extract --dataset ade20k --split training` and `--split validation`; for multi-scale
    mIoU, extract into one store per --img-size and pass each with --store.
    """
    import json

    from ditf_pipeline.pipeline import run_probe
    from ditf_pipeline.pipeline.probe import ProbeSettings, probe_per_class, probe_table
    from ditf_pipeline.pipeline.report import check_output_format

    check_output_format(fmt, ("table", "json"))
    settings = ProbeSettings(variant=variant, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                             warmup_steps=warmup_steps, seed=seed, train_label_side=train_label_side)
    probed = run_probe(model=model, dataset=dataset, data_root=data_root, stores=store, k=k, t=t, settings=settings,
                       train_split=train_split, val_split=val_split, out=out, resume=resume, device=device,
                       workers=workers, progress=progress and not quiet, checkpoint_every=checkpoint_every,
                       ms_average=ms_average)
    report, notes = probed.report, quiet_note(quiet)
    if report.resumed_from is not None:
        notes(f"probe: resumed at step {report.resumed_from} of {report.total_steps}")
    if not report.finished:  # pragma: no cover - only when stopped early through the API
        notes(f"probe: stopped at step {report.steps}; rerun to continue")
        return
    if fmt == "json":
        typer.echo(json.dumps(probed.to_json(), indent=1))
    else:
        typer.echo(probe_table(report))
        if per_class:
            typer.echo(probe_per_class(report))
    notes(f"probe: head and results in {report.out_dir} ({report.seconds:.1f} s)")
