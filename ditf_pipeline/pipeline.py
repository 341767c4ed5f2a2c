"""One library function per stage run, shared by the command line and the Python API.

`ditf extract` and `DiTF.features` both call `run_extract`, so the two give the same numbers by
construction: the same defaults, the same per-image seeding, the same store layout. Heavy
modules (torch, diffusers, zarr) are imported inside the function, so importing this module
stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core.naming import DEFAULT_PCA_DIM

__all__ = ["MatchRun", "ScoreRun", "check_dataset", "check_key", "check_pair_arguments", "reading_store", "run_doctor",
           "run_extract", "run_match", "run_pack", "run_score", "single_key", "stored_variants", "writing_store"]

if TYPE_CHECKING:
    from .datasets.base import Dataset
    from .extract.extractor import ExtractReport
    from .models.base import DiTAdapter
    from .stages import StageReport, StageSettings
    from .store.doctor import Findings
    from .store.feature_store import FeatureStore


def run_extract(
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = "stores/ditf.zarr",
    k: Sequence[int] | None = None,
    t: Sequence[int] | None = None,
    img_size: int | None = None,
    ensemble_size: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    weights: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    resize: str | None = None,
    adapter: DiTAdapter | None = None,
    resample: str | None = None,
    precision: str = "default",
    text_device: str | None = None,
    offload: bool = False,
    shard: str | None = None,
    batch_images: int | None = None,
    compile: str = "auto",
) -> ExtractReport:
    """Run the extract stage into `store`; unset settings come from the benchmark's and the model's defaults.

    `dataset` is a reader name (with `data_root`, `split`) or a ready `Dataset` (the Python API
    passes its in-memory image list). `adapter`, when given, is an already built adapter of
    `model` (the API keeps its weights loaded across calls); otherwise one is built from
    `weights`, `revision`, `dtype`, `device`. With `workers` or `scheduler` the images are
    spread over dask workers, each building its own adapter. `resample` and `precision` follow
    the authors' arithmetic when asked (`--resample`, `--precision paper`; docs/reproducing.md
    "Precision and the authors' arithmetic"); `text_device` and `offload` fit Flux on smaller GPUs
    (docs/models.md "Fitting the GPU you have"). `shard` ("i/N") extracts only that share of the
    images (job arrays; docs/scale.md). `batch_images` (images of one token grid per forward) and
    `compile` ("auto" | "on" | "off": torch.compile the blocks that run) change how fast, not what
    is computed: provenance only (docs/models.md "Speed options on a GPU").
    """
    from .datasets import get_dataset
    from .devices import default_dtype
    from .extract.extractor import Extractor, check_run, default_settings
    from .models import get_spec, load_adapter
    from .core.shards import Shard
    from .store.feature_store import FeatureStore
    from .validate import check_at_least

    spec = adapter.spec if adapter is not None else get_spec(model)
    part = Shard.parse(shard)
    check_at_least("--workers", workers)
    data = get_dataset(dataset, data_root, split) if isinstance(dataset, str) else dataset
    if dtype == "auto":  # --precision paper: the authors' bf16 DiT, on any device
        dtype = "bf16" if precision == "paper" else default_dtype(device)
    settings = default_settings(spec, data, ks=k, ts=t, img_size=img_size, ensemble_size=ensemble_size,
                                batch_size=batch_size, seed=seed, prompt=prompt, resize=resize,
                                resample=resample, precision=precision, batch_images=batch_images, compile=compile)
    if adapter is None:  # lazy: building an adapter loads no weights yet
        adapter = load_adapter(spec.name, weights=weights, revision=revision, dtype=dtype, device=device,
                               text_device=text_device, offload=offload)
    check_run(adapter, settings, data)  # every argument and the annotations, before the store is opened
    if workers or scheduler:  # the same run with the images spread over dask workers
        from .distributed.runners import AdapterArgs, extract_distributed, shared_client

        return extract_distributed(shared_client(workers, scheduler), AdapterArgs(spec.name, weights, revision, dtype, device,
                                                                        text_device, offload),
                                   store, settings, data, progress=progress, shard=part)
    with FeatureStore(store) as feature_store:  # closed: the last writer consolidates the metadata
        return Extractor(adapter, feature_store, settings).run(data, progress=progress, shard=part)


def single_key(k: Sequence[int] | None, t: Sequence[int] | None) -> tuple[int | None, int | None]:
    """One k and one t from repeatable options (None: the only ones stored)."""
    from .core.errors import DitfError

    if (k and len(k) > 1) or (t and len(t) > 1):
        raise DitfError("this command takes one --k and one --t (extract accepts several)")
    return (k[0] if k else None), (t[0] if t else None)


# ---- match and score: the DiT never runs, every number comes from the store ----------------------
def check_pair_arguments(variants: Sequence[str] | None = None, protocol: str = "dift",
                         alphas: Sequence[float] | None = None, out: Path | None = None, device: str = "auto",
                         workers: int | None = None) -> None:
    """The arguments match, score, run and ablate share, checked before anything is read or written."""
    from .validate import check_alphas, check_at_least, check_output_file, check_protocol, check_variants

    check_variants(variants or [])
    check_protocol(protocol)
    check_alphas(alphas)
    check_output_file(out)
    if device != "auto":  # "auto" is answered without torch, so `ditf score` never imports it
        from .devices import check_device

        check_device(device)
    check_at_least("--workers", workers)


def check_key(store: FeatureStore, data: Dataset, model: str, k: Sequence[int] | None, t: Sequence[int] | None,
              variants: Sequence[str] | None = None) -> tuple[int, int]:
    """The (k, t) to use (the only one stored when not given) after checking it gives `variants`."""
    from .selection import select_key
    from .validate import check_variant_supported

    k_, t_ = select_key(store, data.name, model, *single_key(k, t))
    stored = store.open_features(data.name, model, k_, t_).modulation_names
    for variant in variants or []:
        check_variant_supported(variant, model, stored)
    return k_, t_


def stored_variants(store: FeatureStore, data: Dataset, model: str, k: int, t: int, every: bool = True) -> list[str]:
    """Every variant the stored vectors support (`every`), or the default one.

    Models without AdaLN (DINOv2, DIFT) support `raw` only; PixArt has no c-only variant.
    """
    from .validate import supported_variants

    supported = supported_variants(store.open_features(data.name, model, k, t).modulation_names)
    return supported if every or supported == ["raw"] else ["adaln+cd"]


@dataclass
class MatchRun:
    """What `run_match` did: the benchmark, the key it read and one settings + report per variant."""

    data: Dataset
    k: int
    t: int
    settings: list[StageSettings] = field(default_factory=list)
    reports: list[StageReport] = field(default_factory=list)


def run_match(
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = "stores/ditf.zarr",
    k: Sequence[int] | None = None,
    t: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    protocol: str = "dift",
    channels: str = "auto",
    soft_window: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    fuse: str | None = None,
    pca_dim: int = DEFAULT_PCA_DIM,
    device: str = "auto",
    jobs: int | None = None,
    shard: str | None = None,
    on_report: Callable[[StageReport], None] | None = None,
    predictions_store: Path | str | None = None,
) -> MatchRun:
    """Run the match stage for each of `variants` (default: the model's default variant).

    Predictions go next to the features, or into `predictions_store` (a local store: the
    features' store may be a published, read-only one); a rerun resumes. `on_report` hears each
    variant's report as it finishes (the CLI prints its line). With `workers`/`scheduler` the
    blocks of pairs go to dask workers.
    """
    from .datasets import get_dataset
    from .stages import StageSettings, match
    from .store.feature_store import FeatureStore

    check_pair_arguments(variants, protocol, device=device, workers=workers)
    data = get_dataset(dataset, data_root, split) if isinstance(dataset, str) else dataset
    reader = FeatureStore(store, read_only=True)
    k_, t_ = check_key(reader, data, model, k, t, variants)
    variants = list(variants or stored_variants(reader, data, model, k_, t_, every=False))
    client = None
    if workers or scheduler:  # blocks of pairs spread over dask workers
        from .distributed.runners import shared_client

        client = shared_client(workers, scheduler)
    run = MatchRun(data, k_, t_)
    with writing_store(store, reader, predictions_store) as feature_store:  # closed: the last writer consolidates
        for variant in variants:
            settings = StageSettings(variant=variant, protocol=protocol, channels=channels, soft_window=soft_window,
                                     fuse=fuse, pca_dim=pca_dim, device=device, jobs=jobs, shard=shard)
            report = match(feature_store, data, model, k_, t_, settings, overwrite=overwrite, progress=progress,
                           client=client)
            run.settings.append(settings)
            run.reports.append(report)
            if on_report is not None:
                on_report(report)
    return run


def writing_store(store: Path | str, reader: FeatureStore, predictions_store: Path | str | None):
    """The store match writes into: `store` itself, or `reader`'s features paired with `predictions_store`."""
    from .store.feature_store import FeatureStore
    from .store.paired import PairedStore

    if predictions_store is None:
        return FeatureStore(store)
    return PairedStore(reader, FeatureStore(predictions_store))


def reading_store(store: Path | str, predictions_store: Path | str | None):
    """The store score reads: `store`, or its features with the predictions of `predictions_store`."""
    from .store.feature_store import FeatureStore
    from .store.paired import PairedStore

    reader = FeatureStore(store, read_only=True)
    if predictions_store is None:
        return reader
    return PairedStore(reader, FeatureStore(predictions_store, read_only=True))


@dataclass
class ScoreRun:
    """What `run_score` computed: the key it read, one settings and one result per variant."""

    data: Dataset
    k: int
    t: int
    settings: list[StageSettings]
    results: list[dict]


def run_score(
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = "stores/ditf.zarr",
    k: Sequence[int] | None = None,
    t: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    protocol: str = "dift",
    soft_window: int | None = None,
    fuse: str | None = None,
    pca_dim: int = DEFAULT_PCA_DIM,
    alphas: Sequence[float] | None = None,
    settings: Sequence[StageSettings] | None = None,
    predictions_store: Path | str | None = None,
) -> ScoreRun:
    """Metrics of cached predictions (PCK, J&F or homography accuracy), one result per variant.

    Read-only, no torch. Variants default to `adaln+cd` where AdaLN vectors are stored, else
    `raw`; `settings` (e.g. `MatchRun.settings`) replaces the variant options. Predictions
    are read from `predictions_store` when given (what `run_match` wrote there).
    """
    from .datasets import get_dataset
    from .stages import StageSettings, score

    check_pair_arguments(variants, protocol, alphas)
    data = get_dataset(dataset, data_root, split) if isinstance(dataset, str) else dataset
    feature_store = reading_store(store, predictions_store)
    k_, t_ = check_key(feature_store, data, model, k, t, variants)
    if settings is None:
        if not variants:
            stored = feature_store.open_features(data.name, model, k_, t_).modulation_names
            variants = ["adaln+cd"] if "scale" in stored else ["raw"]
        settings = [StageSettings(variant=v, protocol=protocol, soft_window=soft_window, fuse=fuse, pca_dim=pca_dim)
                    for v in variants]
    results = [score(feature_store, data, model, k_, t_, s, alphas) for s in settings]
    return ScoreRun(data, k_, t_, list(settings), results)


# ---- pack: chosen keys into a new store ready to publish ------------------------------------------
def run_pack(store: Path | str, out: Path, *, dataset: str | None = None, model: str | None = None,
             k: int | None = None, t: int | None = None, predictions: bool = True, license: str | None = None,
             note: Callable[[str], None] | None = None) -> dict:
    """`ditf pack`: copy the chosen keys of `store` into `out` (store, manifest, dataset card).

    The sizes are told to `note` before anything is copied; returns the manifest.
    """
    from .core.version import __version__
    from .store.card import card
    from .store.feature_store import FeatureStore
    from .store.pack import check_out, plan_pack, write_pack

    check_out(Path(out))
    source = FeatureStore(store, read_only=True)
    plan = plan_pack(source, dataset=dataset, model=model, k=k, t=t, predictions=predictions)
    if note is not None:
        for item in plan.items:
            note(f"pack: {item.node}: {len(item.files)} file(s), {item.bytes / 1e6:.1f} MB")
        note(f"pack: {plan.bytes / 1e6:.1f} MB in all, into {out}")
    keys = [{"node": item.node, "images": item.images, "bytes": item.bytes, "config": item.config,
             "predictions": item.predictions} for item in plan.keys()]
    text = card(keys, version=__version__, total_bytes=plan.bytes, license=license)
    return write_pack(plan, Path(out), text, version=__version__, progress=note)


# ---- doctor: the dataset check and the store audit, combined ---------------------------------------
def check_dataset(name: str, root: Path, split: str | None, findings: Findings, decode: bool = True) -> list[str]:
    """Every image readable, every annotation parsable; returns the image keys."""
    from .core.errors import DitfError
    from .datasets import get_dataset
    from .core.images import image_size, load_rgb

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


def run_doctor(*, dataset: str = "spair", data_root: Path | None = None, split: str | None = None,
               store: str | Path | None = None, quick: bool = False, repair: bool = False,
               migrate: bool = False) -> Findings:
    """`ditf doctor`: check a dataset root and/or a store; change the store only to `repair` or `migrate`.

    With both, the store is also asked how many of the dataset's images each of its keys has
    not extracted. `quick` reads image headers only and skips reading every stored chunk.
    """
    from .datasets import get_dataset
    from .store.doctor import Findings, check_store

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
