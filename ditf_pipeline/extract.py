"""The extract stage: each image through the DiT once, everything later stages need cached.

For every image and timestep t: VAE-encode, draw the ensemble of noises (seeded by image key
and t, so a rerun is bit-identical), run one forward that serves every requested block k
(stopping after the deepest), average the raw pre-AdaLN z and the (shift, scale, gate) over the
ensemble, add the t-only / c-only modulation (paper Table 5), and commit the image to the store.

Images are decoded ahead of the DiT on a thread pool and store writes run on a writer thread,
so neither sits on the critical path; the store's per-image commit mark makes the run
resumable after a crash at any point.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import SCHEMA_VERSION, __version__
from .datasets.base import Dataset, ImageRecord
from .errors import DitfError
from .images import image_size, load_rgb
from .models.base import DiTAdapter, PromptEmbedding
from .prompts import prompt_identity, prompts_for
from .store import FeatureArrays, FeatureStore


@dataclass
class ExtractSettings:
    """Everything that determines the cached numbers (and so must match to reuse a key)."""

    ks: list[int]
    ts: list[int]
    img_size: int
    ensemble_size: int = 8
    seed: int = 0
    prompt: str = "template"
    batch_size: int | None = None  # split the ensemble; None = whole ensemble in one batch
    resize: str = "long"  # which side goes to img_size: "long" (SPair script) or "short" (DAVIS script)
    workers: int = 2  # image decoding threads


@dataclass
class ExtractReport:
    store: str
    keys: list[str]
    n_images: int
    extracted: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else float("nan")


def default_settings(spec, dataset: Dataset, **given) -> ExtractSettings:
    """Settings from what the user gave, else the benchmark's paper defaults, else the model's.

    A dataset's block/timestep/size defaults (DAVIS: k=24, t=90, short side 960) are the
    paper's for full-size Flux, so they apply to it only; ensemble size and prompt apply to
    every model.
    """
    data = dataset.defaults
    flux = spec.family == "flux" and not spec.tiny
    prompt = given.get("prompt") or data.get("prompt") or "template"
    if prompt not in ("template", "none") and not prompt.startswith(("captions:", "text:")):
        prompt = f"text:{prompt}"  # a dataset's literal prompt, e.g. DAVIS's "a photo of a image"
    return ExtractSettings(
        ks=list(given.get("ks") or [data["k"] if flux and "k" in data else spec.default_k]),
        ts=list(given.get("ts") or [data["t"] if flux and "t" in data else spec.default_t]),
        img_size=given.get("img_size") or (data["img_size"] if flux and "img_size" in data else spec.img_size),
        resize=given.get("resize") or (data["resize"] if flux and "resize" in data else "long"),
        ensemble_size=given.get("ensemble_size") or data.get("ensemble_size", 8),
        batch_size=given.get("batch_size"),
        seed=given.get("seed") or 0,
        prompt=prompt,
    )


def image_seed(seed: int, key: str, timestep: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def store_config(adapter: DiTAdapter, settings: ExtractSettings) -> dict:
    return {
        "model": adapter.spec.name,
        "family": adapter.spec.family,
        # read from the loaded checkpoint: a --weights folder of another width or depth never shares a key
        "architecture": adapter.architecture.as_config(),
        "source": adapter.source or "built-in random weights (seeded)",
        "revision": adapter.revision,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "img_size": settings.img_size,
        "resize_side": settings.resize,
        **adapter.input_config(),  # "resize" (and the pixel normalisation where not [-1, 1])
        "patch_stride": adapter.patch_stride,
        "ensemble_size": settings.ensemble_size,
        "seed": settings.seed,
        "prompt": prompt_identity(settings.prompt),
        "guidance": adapter.spec.guidance,
        "schema_version": SCHEMA_VERSION,
    }


def provenance(adapter: DiTAdapter, settings: ExtractSettings) -> dict:
    import diffusers
    import transformers
    import zarr

    return {
        "ditf": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "python": platform.python_version(),
        "device": str(adapter.device),
        "text_device": str(adapter.text_device),
        "offload": adapter.offload,
        "batch_size": settings.batch_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _conditioning_variants(
    adapter: DiTAdapter, prompt: PromptEmbedding, timestep: int, ks: Sequence[int], image_size: tuple[int, int]
) -> dict:
    """{k: {"shift_t": ..., "scale_t": ..., ...}} for the conditioning ablation, where defined."""
    out: dict[int, dict[str, np.ndarray]] = {k: {} for k in ks}
    for conditioning in ("t", "c"):
        try:
            mods = adapter.modulation(prompt, timestep, ks, conditioning, image_size=image_size)
        except DitfError:
            continue  # e.g. PixArt: AdaLN sees t only, no c-only variant
        for k, mod in mods.items():
            for name in ("shift", "scale", "gate"):
                out[k][f"{name}_{conditioning}"] = getattr(mod, name).float().cpu().numpy()
    return out


def modulation_names(adapter: DiTAdapter) -> list[str]:
    if not adapter.has_adaln:
        return []
    names = ["shift_t", "scale_t", "gate_t"]
    if adapter.spec.family != "pixart":
        names += ["shift_c", "scale_c", "gate_c"]
    return names


class Extractor:
    """Runs one adapter over a dataset into a store."""

    def __init__(self, adapter: DiTAdapter, store: FeatureStore, settings: ExtractSettings) -> None:
        self.adapter = adapter
        self.store = store
        self.settings = settings
        settings.ks = adapter.check_indices(settings.ks)
        if not adapter.stochastic:
            settings.ensemble_size = 1  # no noise: every ensemble member would be identical
        if not adapter.conditioned:
            settings.prompt = "none"
        if settings.ensemble_size < 1:
            raise DitfError("--ensemble-size must be at least 1")
        if any(not 0 <= t < 1000 for t in settings.ts):
            raise DitfError("timesteps must be in 0..999")

    # ---- prompts ------------------------------------------------------------------------------
    def encode_prompts(self, texts: set[str]) -> dict[str, PromptEmbedding]:
        """Embeddings for every prompt, encoding (and caching) only the missing ones."""
        adapter = self.adapter
        cache = self.store.prompt_cache(
            adapter.spec.name,
            {"source": adapter.source, "revision": adapter.revision, "dtype": str(adapter.dtype), "model": adapter.spec.name},
        )
        found = cache.get_many(texts)
        missing = sorted(texts - set(found))
        if missing:
            for text, embedding in zip(missing, adapter.encode_prompts(missing)):
                numpy_embedding = {name: value.float().numpy() for name, value in embedding.items()}
                cache.put(text, numpy_embedding)
                found[text] = numpy_embedding
            adapter.release_text_encoders()
        return {text: {name: torch.from_numpy(np.asarray(v)) for name, v in emb.items()} for text, emb in found.items()}

    # ---- one image ----------------------------------------------------------------------------
    def features_for(self, pixels: np.ndarray, prompt: PromptEmbedding, key: str, timestep: int, ks: Sequence[int]):
        """Ensemble-averaged features of one image at one timestep for blocks `ks`."""
        adapter, settings = self.adapter, self.settings
        generator = torch.Generator().manual_seed(image_seed(settings.seed, key, timestep))
        image = torch.from_numpy(pixels)[None]
        ensemble = settings.ensemble_size
        batch = settings.batch_size or ensemble
        sums: dict[int, dict[str, torch.Tensor]] = {}
        for start in range(0, ensemble, batch):
            count = min(batch, ensemble - start)
            latents = adapter.encode_images(image.expand(count, *image.shape[1:]), generator)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
            noisy = adapter.add_noise(latents, noise, timestep)
            for k, block in adapter.forward_intermediates(noisy, prompt, timestep, ks).items():
                parts = {"pre_adaln": block.pre_adaln.float().sum(0)}
                if block.modulation is not None:  # None: a model without AdaLN
                    for name in ("shift", "scale", "gate"):
                        parts[name] = getattr(block.modulation, name).float().sum(0)
                if k not in sums:
                    sums[k] = parts
                else:
                    for name, value in parts.items():
                        sums[k][name] += value
        extra = (
            _conditioning_variants(adapter, prompt, timestep, ks, image_size=tuple(pixels.shape[1:]))
            if adapter.has_adaln else {k: {} for k in ks}
        )
        out = {}
        for k, parts in sums.items():
            means = {name: (value / ensemble).cpu().numpy() for name, value in parts.items()}
            pre_adaln = means.pop("pre_adaln")
            if not np.isfinite(pre_adaln).all():
                raise DitfError(f"non-finite features for {key} at k={k}, t={timestep} (try --dtype fp32)")
            if np.abs(pre_adaln).max() > 65504:
                raise DitfError(f"features of {key} at k={k} overflow float16 storage")
            out[k] = (pre_adaln.astype(np.float16), {**means, **extra[k]})
        return out

    # ---- the run ----------------------------------------------------------------------------
    def run(self, dataset: Dataset, progress: bool = True, records: Sequence[ImageRecord] | None = None) -> ExtractReport:
        start_time = time.perf_counter()
        adapter, settings, store = self.adapter, self.settings, self.store
        records = list(records if records is not None else dataset.images())
        if not records:
            raise DitfError(f"dataset {dataset.name} at {dataset.root} has no images")
        sizes = [image_size(record.path) for record in records]
        rows = store.register_images(dataset.name, [r.key for r in records], sizes)
        n_rows = len(rows)
        config = store_config(adapter, settings)
        arrays: dict[tuple[int, int], FeatureArrays] = {}
        with contextlib.ExitStack() as locks:
            for t in settings.ts:
                for k in settings.ks:
                    rows_max, cols_max, channels = adapter.feature_shape(settings.img_size, k)
                    if settings.resize != "long":  # the grid's extent follows each image's aspect ratio
                        grids = [adapter.grid_size(w, h, settings.img_size, settings.resize) for w, h in sizes]
                        rows_max, cols_max = max(g[0] for g in grids), max(g[1] for g in grids)
                    # one writer per key: a second extract into the same key is refused, not interleaved
                    locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t))
                    arrays[(k, t)] = store.open_features(
                        dataset.name, adapter.spec.name, k, t, config=config, provenance=provenance(adapter, settings),
                        n_images=n_rows, grid_max=(rows_max, cols_max), hidden_size=channels,
                        modulation_names=modulation_names(adapter), adaln=adapter.has_adaln,
                    )
            return self._run_locked(dataset, records, rows, arrays, start_time, progress)

    def _run_locked(self, dataset, records, rows, arrays, start_time, progress) -> ExtractReport:
        settings, store = self.settings, self.store
        complete = {key: array.complete() for key, array in arrays.items()}
        todo = [r for r in records if not all(complete[key][rows[r.key]] for key in arrays)]
        report = ExtractReport(
            store=str(store.path), keys=[a.path for a in arrays.values()], n_images=len(records),
            extracted=len(todo), skipped=len(records) - len(todo), seconds=0.0,
        )
        if todo:
            texts = prompts_for(todo, settings.prompt)
            embeddings = self.encode_prompts(set(texts.values()))
            self._extract(todo, rows, texts, embeddings, arrays, complete, progress)
        report.seconds = time.perf_counter() - start_time
        return report

    def _decoded(self, records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        """Decode and preprocess images ahead of the DiT (bounded lookahead)."""
        def load(record: ImageRecord) -> np.ndarray:
            return self.adapter.prepare_image(load_rgb(record.path), self.settings.img_size, side=self.settings.resize)

        with ThreadPoolExecutor(max_workers=max(1, self.settings.workers)) as pool:
            lookahead = 2 * max(1, self.settings.workers)
            futures = [pool.submit(load, r) for r in records[:lookahead]]
            for i, record in enumerate(records):
                pixels = futures[i].result()
                if i + lookahead < len(records):
                    futures.append(pool.submit(load, records[i + lookahead]))
                futures[i] = None
                yield record, pixels

    def _extract(self, todo, rows, texts, embeddings, arrays, complete, progress) -> None:
        from tqdm.auto import tqdm

        writes: queue.Queue = queue.Queue(maxsize=4)
        failure: list[BaseException] = []

        def writer() -> None:
            while (item := writes.get()) is not None:
                if failure:
                    continue
                try:
                    array, row, pre_adaln, modulation = item
                    array.write_image(row, pre_adaln, modulation)
                except BaseException as exc:  # surfaced on the main thread
                    failure.append(exc)

        thread = threading.Thread(target=writer, name="ditf-store-writer", daemon=True)
        thread.start()
        try:
            bar = tqdm(total=len(todo), desc=f"extract {self.adapter.spec.name}", unit="img", disable=not progress)
            for record, pixels in self._decoded(todo):
                row = rows[record.key]
                prompt = embeddings[texts[record.key]]
                for t in self.settings.ts:
                    ks = [k for k in self.settings.ks if not complete[(k, t)][row]]
                    if not ks:
                        continue
                    for k, (pre_adaln, modulation) in self.features_for(pixels, prompt, record.key, t, ks).items():
                        writes.put((arrays[(k, t)], row, pre_adaln, modulation))
                    if failure:
                        raise failure[0]
                bar.update(1)
            bar.close()
        finally:
            writes.put(None)
            thread.join()
        if failure:
            raise failure[0]
