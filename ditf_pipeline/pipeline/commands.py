"""One library function per stage run, shared by the command line and the Python API.

`ditf extract` and `DiTF.features` both call `run_extract` (`DiTF.features` without a store
calls `extract_in_memory`, the same settings and extractor with in-memory sinks), so they give
the same numbers by construction: the same defaults, the same per-image seeding, the same
store layout. Heavy
modules (torch, diffusers, zarr) are imported inside the function, so importing this module
stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ["DEFAULT_STORE", "MatchRun", "ScoreRun", "check_key", "check_pair_arguments", "extract_in_memory", "list_models", "reading_store",
           "run_ablate", "run_all", "run_extract", "run_match", "run_score", "single_key", "stored_variants", "writing_store"]

if TYPE_CHECKING:
    from ..core.settings import FeatureSettings, LoadSettings, MatchSettings, RunSettings
    from ..datasets.base import Dataset
    from ..extract.extractor import ExtractReport
    from ..models.base import DiTAdapter
    from ..store.feature_store import FeatureStore
    from .stages import StageReport


DEFAULT_STORE = "stores/ditf.zarr"  # a str: a store may also be a URL


def run_extract(
    *,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = DEFAULT_STORE,
    features: FeatureSettings | None = None,
    run: RunSettings | None = None,
    load: LoadSettings | None = None,
    adapter: DiTAdapter | None = None,
    progress: bool = True,
    **fields,
) -> ExtractReport:
    """Run the extract stage into `store`; unset settings come from the benchmark's and the model's defaults.

    What is computed is `features` (`FeatureSettings`: model, k, t, image size, ensemble, prompt,
    precision ...), how it runs is `run` (`RunSettings`: device, batching, compile, offload,
    shard, workers) and where the weights come from is `load` (`LoadSettings`). Any field of the
    three may instead be passed by name (``run_extract(dataset="spair", model="tiny-flux",
    k=[1], device="cpu")``); a named field replaces that of the object passed.

    `dataset` is a reader name (with `data_root`, `split`) or a ready `Dataset` (the Python API
    passes its in-memory image list). `adapter`, when given, is an already built adapter (the
    API keeps its weights loaded across calls; its model wins over `features.model`). With
    `run.workers` or `run.scheduler` the images are spread over dask workers, each building its
    own adapter. `run.shard` ("i/N") extracts only that share of the images (docs/scale.md);
    `run.batch_images` and `run.compile` change how fast, not what is computed.
    """
    from ..core.settings import split_fields
    from ..core.shards import Shard
    from ..extract.extractor import Extractor, check_run
    from ..models import get_spec
    from ..store.feature_store import FeatureStore
    from ..validate import check_at_least

    features, run, load = split_fields(fields, features, run, load)
    if adapter is None:
        get_spec(features.model)  # an unknown model is named before anything else
    part = Shard.parse(run.shard)
    check_at_least("--workers", run.workers)
    data, settings, adapter, load = _extract_plan(dataset, data_root, split, features, run, load, adapter)
    check_run(adapter, settings, data)  # every argument and the annotations, before the store is opened
    if run.workers or run.scheduler:  # the same run with the images spread over dask workers
        from ..distributed.runners import AdapterArgs, extract_distributed, shared_client

        args = AdapterArgs(adapter.spec.name, load.weights, load.revision, load.dtype, run.device, load.text_device,
                           run.offload)
        return extract_distributed(shared_client(run.workers, run.scheduler), args, store, settings, data,
                                   progress=progress, shard=part)
    with FeatureStore(store) as feature_store:  # closed: the last writer consolidates the metadata
        return Extractor(adapter, feature_store, settings).run(data, progress=progress, shard=part)


def extract_in_memory(
    *,
    dataset: Dataset,
    adapter: DiTAdapter,
    features: FeatureSettings | None = None,
    run: RunSettings | None = None,
    progress: bool = False,
    **fields,
) -> tuple[dict[str, int], dict]:
    """`run_extract` of an in-memory image list without a store: (row of each image key, the
    features of each (k, t) as `extract.writer.MemoryFeatures`).

    The same settings, defaults and arithmetic as `run_extract` (`DiTF.features()` without
    `store=` computes the numbers a store would hold, float16 z included), but nothing is written
    anywhere: no temporary store, no image index, no prompt cache on disk (the adapter's prompt
    memory keeps the encoded prompts across calls).
    """
    from ..core.settings import split_fields
    from ..extract.extractor import Extractor, check_run

    features, run, load = split_fields(fields, features, run, None)
    data, settings, adapter, _ = _extract_plan(dataset, None, None, features, run, load, adapter)
    check_run(adapter, settings, data)
    return Extractor(adapter, None, settings).run_in_memory(data, progress=progress)


def _extract_plan(dataset, data_root, split, features, run, load, adapter):
    """(dataset, `ExtractSettings`, adapter, load) of an extract: settings from what was
    given, else the benchmark's and the model's defaults; the adapter built (no weights loaded)
    unless given. `load.dtype` comes back resolved ("auto": bf16 for --precision paper, else the
    device's default)."""
    from dataclasses import replace

    from ..datasets import get_dataset
    from ..devices import default_dtype
    from ..extract.extractor import default_settings
    from ..models import get_spec, load_adapter

    spec = adapter.spec if adapter is not None else get_spec(features.model)
    data = get_dataset(dataset, data_root, split) if isinstance(dataset, str) else dataset
    dtype = load.dtype
    if dtype == "auto":  # --precision paper: the authors' bf16 DiT, on any device
        dtype = "bf16" if features.precision == "paper" else default_dtype(run.device)
    settings = default_settings(spec, data, ks=features.k, ts=features.t, img_size=features.img_size,
                                ensemble_size=features.ensemble_size, batch_size=run.batch_size, seed=features.seed,
                                prompt=features.prompt, resize=features.resize, resample=features.resample,
                                precision=features.precision, batch_images=run.batch_images, compile=run.compile)
    if adapter is None:  # lazy: building an adapter loads no weights yet
        adapter = load_adapter(spec.name, weights=load.weights, revision=load.revision, dtype=dtype,
                               device=run.device, text_device=load.text_device, offload=run.offload)
    return data, settings, adapter, replace(load, dtype=dtype)


def list_models() -> list:
    """`ditf models`: the spec of every registered model (name, blocks, width, defaults, weights)."""
    from ..models import get_spec, model_names

    return [get_spec(name) for name in model_names()]


def single_key(k: Sequence[int] | int | None, t: Sequence[int] | int | None) -> tuple[int | None, int | None]:
    """One k and one t from repeatable options (None: chosen by `select_key`)."""
    from ..core.errors import DitfError

    k = [k] if isinstance(k, int) else k
    t = [t] if isinstance(t, int) else t
    if (k and len(k) > 1) or (t and len(t) > 1):
        raise DitfError("this command takes one --k and one --t (extract accepts several)")
    return (k[0] if k else None), (t[0] if t else None)


# ---- match and score: the DiT never runs, every number comes from the store ----------------------
def check_pair_arguments(variants: Sequence[str] | None = None, protocol: str = "dift",
                         alphas: Sequence[float] | None = None, out: Path | None = None, device: str = "auto",
                         workers: int | None = None) -> None:
    """The arguments match, score, run and ablate share, checked before anything is read or written."""
    from ..validate import check_alphas, check_at_least, check_output_file, check_protocol, check_variants

    check_variants(variants or [])
    check_protocol(protocol)
    check_alphas(alphas)
    check_output_file(out)
    if device != "auto":  # "auto" is answered without torch, so `ditf score` never imports it
        from ..devices import check_device

        check_device(device)
    check_at_least("--workers", workers)


def check_key(store: FeatureStore, data: Dataset, model: str, k: Sequence[int] | int | None,
              t: Sequence[int] | int | None, variants: Sequence[str] | None = None) -> tuple[int, int]:
    """The (k, t) to use after checking it gives `variants`.

    One rule for every command and the API (`selection.select_key`): among the stored keys that
    match what was given, the model's default key when stored, else the only one, else an error
    listing them.
    """
    from ..selection import select_key
    from ..validate import check_variant_supported

    k_, t_ = select_key(store, data.name, model, *single_key(k, t))
    stored = store.open_features(data.name, model, k_, t_).modulation_names
    for variant in variants or []:
        check_variant_supported(variant, model, stored)
    return k_, t_


def stored_variants(store: FeatureStore, data: Dataset, model: str, k: int, t: int, every: bool = True) -> list[str]:
    """Every variant the stored vectors support (`every`), or the default one.

    Models without AdaLN (DINOv2, DIFT) support `raw` only; PixArt has no c-only variant.
    """
    from ..validate import supported_variants

    supported = supported_variants(store.open_features(data.name, model, k, t).modulation_names)
    return supported if every or supported == ["raw"] else ["adaln+cd"]


def _dataset(dataset: str | Dataset, data_root, split) -> Dataset:
    from ..datasets import get_dataset

    return get_dataset(dataset, data_root, split) if isinstance(dataset, str) else dataset


@dataclass
class MatchRun:
    """What `run_match` did: the benchmark, the key it read and one settings + report per variant."""

    data: Dataset
    k: int
    t: int
    settings: list[MatchSettings] = field(default_factory=list)
    reports: list[StageReport] = field(default_factory=list)


def run_match(
    *,
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = DEFAULT_STORE,
    k: Sequence[int] | int | None = None,
    t: Sequence[int] | int | None = None,
    variants: Sequence[str] | None = None,
    settings: MatchSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    on_report: Callable[[StageReport], None] | None = None,
    predictions_store: Path | str | None = None,
    **fields,
) -> MatchRun:
    """Run the match stage for each of `variants` (default: the model's default variant).

    `settings` (a `MatchSettings`) holds the protocol, channels, fuse, device, jobs and shard;
    any of its fields may be passed by name instead (``protocol="geoaware"``). Predictions go
    next to the features, or into `predictions_store` (a local store: the features' store may
    be a published, read-only one); a rerun resumes. `on_report` hears each variant's report as it
    finishes (the CLI prints its line). With `workers`/`scheduler` the blocks of pairs go to
    dask workers.
    """
    from dataclasses import replace

    from ..core.settings import MatchSettings

    base = replace(settings or MatchSettings(), **fields)
    with contextlib.ExitStack() as stack:
        pool = None
        if not (workers or scheduler):
            from ..match.early import early_pool

            # worker processes boot while the rest of the start-up runs (`match/early.py`)
            pool = early_pool(base)
            if pool is not None:
                stack.enter_context(pool)
        data = _dataset(dataset, data_root, split)
        early = None
        if pool is not None:
            from ..match.predict import early_executor

            early = early_executor(base, len(data.pairs()) if data.task == "pairs" else 0, pool)
            if early is not None:
                stack.enter_context(early)
        return _run_match(base, data, model, store, k, t, variants, overwrite, progress, workers, scheduler,
                          on_report, predictions_store, early)


def _run_match(base, data, model, store, k, t, variants, overwrite, progress, workers, scheduler, on_report,
               predictions_store, early) -> MatchRun:
    """`run_match` once its dataset is read (and its worker pool, if any, started: `early`, used by
    the first variant)."""
    from dataclasses import replace

    from ..store.feature_store import FeatureStore
    from .stages import match

    check_pair_arguments(variants, base.protocol, device=base.device, workers=workers)
    reader = FeatureStore(store, read_only=True)
    k_, t_ = check_key(reader, data, model, k, t, variants)
    variants = list(variants or stored_variants(reader, data, model, k_, t_, every=False))
    client = None
    if workers or scheduler:  # blocks of pairs spread over dask workers
        from ..distributed.runners import shared_client

        client = shared_client(workers, scheduler)
    run = MatchRun(data, k_, t_)
    with writing_store(store, reader, predictions_store) as feature_store:  # closed: the last writer consolidates
        for variant in variants:
            chosen = replace(base, variant=variant)
            report = match(feature_store, data, model, k_, t_, chosen, overwrite=overwrite, progress=progress,
                           client=client, executor=early)
            if early is not None:  # the pool served the first variant; later ones start their own
                early.__exit__(None, None, None)
                early = None
            run.settings.append(chosen)
            run.reports.append(report)
            if on_report is not None:
                on_report(report)
    return run


@dataclass
class ScoreRun:
    """What `run_score` computed: the key it read, one settings and one result per variant."""

    data: Dataset
    k: int
    t: int
    settings: list[MatchSettings]
    results: list[dict]
    per_pair: list[dict] | None = None


def run_score(
    *,
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = DEFAULT_STORE,
    k: Sequence[int] | int | None = None,
    t: Sequence[int] | int | None = None,
    variants: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    settings: Sequence[MatchSettings] | None = None,
    per_pair: bool = False,
    out: Path | None = None,
    predictions_store: Path | str | None = None,
    **fields,
) -> ScoreRun:
    """Metrics of cached predictions (PCK, J&F or homography accuracy), one result per variant.

    Read-only, no torch. Variants default to `adaln+cd` where AdaLN vectors are stored, else
    `raw`; `settings` (e.g. `MatchRun.settings`) replaces the variant options, otherwise the
    fields of `MatchSettings` given by name (protocol, soft_window, fuse, pca_dim) apply to
    each variant. `per_pair` also returns one row per pair (keypoint benchmarks). Predictions
    are read from `predictions_store` when given (what `run_match` wrote there).
    """
    from ..core.errors import DitfError
    from ..core.settings import MatchSettings
    from .stages import score

    base = MatchSettings(**fields)
    check_pair_arguments(variants, base.protocol, alphas, out)
    data = _dataset(dataset, data_root, split)
    if per_pair and data.task != "pairs":
        raise DitfError(f"--per-pair writes keypoint-pair rows; {data.name} is a {data.task} benchmark")
    feature_store = reading_store(store, predictions_store)
    k_, t_ = check_key(feature_store, data, model, k, t, variants)
    if settings is None:
        if not variants:
            stored = feature_store.open_features(data.name, model, k_, t_).modulation_names
            variants = ["adaln+cd"] if "scale" in stored else ["raw"]
        from dataclasses import replace

        settings = [replace(base, variant=v) for v in variants]
    results = [score(feature_store, data, model, k_, t_, s, alphas) for s in settings]
    rows = None
    if per_pair:
        from ..score.evaluate import per_pair as per_pair_rows

        rows = [row for s in settings
                for row in per_pair_rows(feature_store, data, model, k_, t_, s.prediction_name("pairs"), alphas)]
    return ScoreRun(data, k_, t_, list(settings), results, rows)


def run_ablate(
    *,
    model: str,
    dataset: str | Dataset,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = DEFAULT_STORE,
    k: Sequence[int] | int | None = None,
    t: Sequence[int] | int | None = None,
    variants: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    aggregation: str | None = None,
    out: Path | None = None,
    progress: bool = True,
    on_report: Callable[[StageReport], None] | None = None,
    predictions_store: Path | str | None = None,
    **fields,
) -> tuple[ScoreRun, str]:
    """Table 4 / 5: every variant the store supports (or `variants`) matched and scored on one key.

    Returns the scores and the aggregation the table uses (the benchmark's when not given).
    """
    from ..core.errors import DitfError
    from ..core.settings import MatchSettings
    from ..store.feature_store import FeatureStore
    from ..validate import check_choice

    base = MatchSettings(**fields)
    check_pair_arguments(variants, base.protocol, alphas, out)
    if aggregation is not None:
        check_choice("aggregation", aggregation, ("per_point", "per_image"))
    data = _dataset(dataset, data_root, split)
    if data.task != "pairs":
        raise DitfError(f"ablate compares PCK tables; for {data.name} run `ditf score --variant ...` per variant")
    if not variants:
        reader = FeatureStore(store, read_only=True)
        variants = stored_variants(reader, data, model, *check_key(reader, data, model, k, t))
    matched = run_match(model=model, dataset=data, store=store, k=k, t=t, variants=variants, settings=base,
                        progress=progress, on_report=on_report, predictions_store=predictions_store)
    scored = run_score(model=model, dataset=data, store=store, k=matched.k, t=matched.t, alphas=alphas,
                       settings=matched.settings, predictions_store=predictions_store)
    return scored, aggregation or data.primary_aggregation


def writing_store(store: Path | str, reader: FeatureStore, predictions_store: Path | str | None):
    """The store match writes into: `store` itself, or `reader`'s features paired with `predictions_store`."""
    from ..store.feature_store import FeatureStore
    from ..store.paired import PairedStore

    if predictions_store is None:
        return FeatureStore(store)
    return PairedStore(reader, FeatureStore(predictions_store))


def reading_store(store: Path | str, predictions_store: Path | str | None):
    """The store score reads: `store`, or its features with the predictions of `predictions_store`."""
    from ..store.feature_store import FeatureStore
    from ..store.paired import PairedStore

    reader = FeatureStore(store, read_only=True)
    if predictions_store is None:
        return reader
    return PairedStore(reader, FeatureStore(predictions_store, read_only=True))


def run_all(
    *,
    dataset: str,
    data_root: Path | str | None = None,
    split: str | None = None,
    store: Path | str = DEFAULT_STORE,
    features: FeatureSettings | None = None,
    run: RunSettings | None = None,
    load: LoadSettings | None = None,
    variants: Sequence[str] | None = None,
    match: MatchSettings | None = None,
    alphas: Sequence[float] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_extract: Callable[[ExtractReport], None] | None = None,
    on_report: Callable[[StageReport], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    **fields,
) -> list[dict]:
    """`ditf run`: extract, then match and score every key extracted (each stage resumes).

    With `run.shard` this job extracts its share of the images and matches its share of the
    pair blocks; the scores come once every share is matched, so a shard that finds others
    still missing reports that (through `on_note`) and returns no results.
    """
    from dataclasses import replace

    from ..core.errors import DitfError
    from ..core.keys import FeatureKey
    from ..core.settings import MatchSettings, split_fields

    features, run, load = split_fields(fields, features, run, load)
    match = replace(match or MatchSettings(), device=run.device, jobs=run.jobs, shard=run.shard)
    check_pair_arguments(variants, match.protocol, alphas, out, run.device, run.workers)
    report = run_extract(dataset=dataset, data_root=data_root, split=split, store=store, features=features, run=run,
                         load=load, progress=progress)
    if on_extract is not None:
        on_extract(report)
    results = []
    for path in report.keys:
        key = FeatureKey.parse("/".join(path.strip("/").split("/")[-4:]))
        try:
            matched = run_match(model=features.model, dataset=dataset, data_root=data_root, split=split, store=store,
                                k=key.k, t=key.t, variants=variants, settings=match, overwrite=overwrite,
                                progress=progress, workers=run.workers, scheduler=run.scheduler, on_report=on_report)
            scores = run_score(model=features.model, dataset=matched.data, store=store, k=key.k, t=key.t,
                               alphas=alphas, settings=matched.settings)
        except DitfError as exc:
            # a shard meets the others' unfinished work: missing features or predictions are not an error yet
            unfinished = ("`ditf extract`" in str(exc) or "`ditf match` first" in str(exc)) and "first" in str(exc)
            if run.shard is None or not unfinished:
                raise
            if on_note is not None:
                on_note(f"run: shard {run.shard} done; the other shards have not finished ({exc}), so the scores "
                        "wait: the same `ditf run` without --shard scores once every shard is done")
            return []
        results += scores.results
    return results
