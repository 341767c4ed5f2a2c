"""One library function per stage run, shared by the command line and the Python API.

`ditf extract` and `DiTF.features` both call `run_extract`, so the two give the same numbers by
construction: the same defaults, the same per-image seeding, the same store layout. Heavy
modules (torch, diffusers, zarr) are imported inside the function, so importing this module
stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ["run_extract", "single_key"]

if TYPE_CHECKING:
    from .datasets.base import Dataset
    from .extract.extractor import ExtractReport
    from .models.base import DiTAdapter


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
    the authors' arithmetic when asked (`--resample`, `--precision paper`; see README "Precision");
    `text_device` and `offload` fit Flux on smaller GPUs (README "Memory"). `shard` ("i/N")
    extracts only that share of the images (job arrays; README "Scale"). `batch_images` (images
    of one token grid per forward) and `compile` ("auto" | "on" | "off": torch.compile the blocks
    that run) change how fast, not what is computed: provenance only (README "Performance").
    """
    from .datasets import get_dataset
    from .devices import default_dtype
    from .extract.extractor import Extractor, check_run, default_settings
    from .models import get_spec, load_adapter
    from .shards import Shard
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
    return Extractor(adapter, FeatureStore(store), settings).run(data, progress=progress, shard=part)


def single_key(k: Sequence[int] | None, t: Sequence[int] | None) -> tuple[int | None, int | None]:
    """One k and one t from repeatable options (None: the only ones stored)."""
    from .errors import DitfError

    if (k and len(k) > 1) or (t and len(t) > 1):
        raise DitfError("this command takes one --k and one --t (extract accepts several)")
    return (k[0] if k else None), (t[0] if t else None)
