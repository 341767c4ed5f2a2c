"""The extract stage: each image through the DiT once, everything later stages need cached.

For every image: VAE-encode once (in fp32); for every timestep t: draw each ensemble member's
posterior sample and noise (seeded by image key, t and member, so a rerun is bit-identical
whatever the batch size), run one forward per batch that serves every requested block k
(stopping after the deepest), average the raw pre-AdaLN z and the (shift, scale, gate) over the
ensemble, add the t-only / c-only modulation (paper Table 5), and commit the image to the store.

Images are decoded ahead of the DiT on a thread pool and store writes run on a writer thread,
so neither sits on the critical path; the store's per-image commit mark makes the run
resumable after a crash at any point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import SCHEMA_VERSION, __version__
from ..datasets.base import Dataset, ImageRecord, check_annotated_sizes
from ..errors import DitfError
from .images import RESAMPLERS, image_size, load_for_model
from ..models.base import DiTAdapter, LatentPosterior, PromptEmbedding
from .prompts import prompt_identity, prompts_for
from ..shards import Shard
from ..store.feature_store import ROWS_PER_SHARD, FeatureArrays, FeatureStore, config_differences


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
    resample: str = "pil-bicubic"  # `images.RESAMPLERS`: "cv2-bilinear" is the DAVIS script's
    precision: str = "default"  # `PRECISIONS`: "paper" = the authors' bf16 / fp16 cast points
    workers: int = 2  # image decoding threads


#: --precision: "default" runs the DiT in the dtype asked for, averages the ensemble in fp32 and
#: stores z as fp16 (matching then computes in fp32); "paper" is the authors' bf16 path: the DiT
#: in bf16 (so timestep and guidance embeddings are rounded in bf16, 3500 -> 3504), ensemble
#: means rounded to bf16 (their `.mean(0)` of a bf16 batch), and at match time the variant in
#: bf16, cast to fp16, upsampled and compared in fp16 (`ditf_pipeline.match.paper`).
PRECISIONS = ("default", "paper")
#: seconds a shard waits for another shard (or a whole run) setting up the same key
SHARD_SETUP_WAIT = 600.0

#: How ensemble member m's posterior sample and noise are drawn (recorded in every key's config)
VAE_SAMPLING = "vae once per image; member m: eps then noise from seed(seed, key, t, m), float32 on the CPU"

#: Which arithmetic `images.model_size` follows (recorded so keys of the older rule are refused)
RESIZE_RULE = "authors': long side int(round(side*scale/16))*16 (half to even); short side (size*long)/short floored"


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

    def line(self) -> str:
        """The one-line summary `ditf extract` prints."""
        return (
            f"extract: {self.extracted} image(s) extracted, {self.skipped} already complete, "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} img/s) -> {self.store} [{', '.join(self.keys)}]"
        )


def default_settings(spec, dataset: Dataset, **given) -> ExtractSettings:
    """Settings from what the user gave, else the benchmark's paper defaults, else the model's.

    A dataset's block/timestep/size defaults (DAVIS: k=24, t=90, short side 960) are the
    paper's for full-size Flux, so they apply to it only; ensemble size and prompt apply to
    every model.
    """
    data = dataset.defaults
    flux = spec.family == "flux" and not spec.tiny
    given = {name: value for name, value in given.items() if value is not None}  # 0 is a value, not "unset"
    prompt = given.get("prompt") or data.get("prompt") or "template"
    if prompt not in ("template", "none") and not prompt.startswith(("captions:", "text:")):
        prompt = f"text:{prompt}"  # a dataset's literal prompt, e.g. DAVIS's "a photo of a image"
    return ExtractSettings(
        ks=list(given.get("ks") or [data["k"] if flux and "k" in data else spec.default_k]),
        ts=list(given.get("ts") or [data["t"] if flux and "t" in data else spec.default_t]),
        img_size=given.get("img_size", data["img_size"] if flux and "img_size" in data else spec.img_size),
        resize=given.get("resize", data["resize"] if flux and "resize" in data else "long"),
        resample=given.get("resample", data.get("resample", "pil-bicubic")),
        precision=given.get("precision", "default"),
        ensemble_size=given.get("ensemble_size", data.get("ensemble_size", 8)),
        batch_size=given.get("batch_size"),
        seed=given.get("seed", 0),
        prompt=prompt,
    )


def check_settings(settings: ExtractSettings, patch_stride: int) -> None:
    """Every extract setting in range, before the store is opened: a key configured with a bad
    value would refuse every later valid run."""
    from ..validate import check_at_least, check_blocks, check_choice, check_img_size, check_timesteps

    check_img_size(settings.img_size, patch_stride)
    check_choice("--resize side", settings.resize, ("long", "short"))
    check_at_least("--ensemble-size", settings.ensemble_size)
    check_at_least("--batch-size", settings.batch_size)
    check_at_least("decoding workers", settings.workers)
    check_blocks(settings.ks)
    check_timesteps(settings.ts)
    check_choice("--resample", settings.resample, RESAMPLERS)
    check_choice("--precision", settings.precision, PRECISIONS)
    if not settings.ks or not settings.ts:
        raise DitfError("extract needs at least one --k and one --t")


def check_precision(adapter: DiTAdapter, settings: ExtractSettings) -> None:
    """`--precision paper` is the authors' bf16 DiT: any other loaded dtype would not be their arithmetic."""
    if settings.precision == "paper" and adapter.dtype != torch.bfloat16:
        raise DitfError(
            f"--precision paper runs the DiT in bf16 as the authors do; it was loaded in "
            f"{str(adapter.dtype).replace('torch.', '')} (pass --dtype bf16 or leave --dtype auto)"
        )


def check_run(adapter: DiTAdapter, settings: ExtractSettings, dataset: Dataset | None = None) -> None:
    """Everything an extract can check before it opens the store: settings, block indices
    for this model and, with `dataset`, the annotations (parsed and checked by the reader)."""
    check_settings(settings, adapter.patch_stride)
    check_precision(adapter, settings)
    adapter.check_indices(settings.ks)
    if dataset is not None:
        dataset.images()


def image_seed(seed: int, key: str, timestep: int, member: int | None = None) -> int:
    """A 63-bit seed from the run seed, image key, timestep and (optionally) ensemble member."""
    text = f"{seed}:{key}:{timestep}" if member is None else f"{seed}:{key}:{timestep}:{member}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def member_draws(seed: int, key: str, timestep: int, members: range, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, noise) of ensemble `members`, each (len(members), *shape) float32 on the CPU.

    Each member has its own generator (eps first, then noise), so member m's numbers do not
    depend on how the ensemble is split into batches, nor on the device.
    """
    eps, noise = [], []
    for member in members:
        generator = torch.Generator().manual_seed(image_seed(seed, key, timestep, member))
        eps.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        noise.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(eps), torch.stack(noise)


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
        "resize_rule": RESIZE_RULE,
        "resample": settings.resample,
        **adapter.input_config(),  # "resize" (and the pixel normalisation where not [-1, 1])
        "vae_dtype": str(adapter.vae_dtype).replace("torch.", "") if adapter.vae_dtype is not None else None,
        "vae_sampling": VAE_SAMPLING if adapter.stochastic else None,
        "precision": settings.precision,
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
        check_settings(settings, adapter.patch_stride)
        settings.ks = adapter.check_indices(settings.ks)
        if not adapter.stochastic:
            settings.ensemble_size = 1  # no noise: every ensemble member would be identical
        if not adapter.conditioned:
            settings.prompt = "none"
        check_precision(adapter, settings)

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
    def encode(self, pixels: np.ndarray) -> LatentPosterior:
        """The VAE posterior of one image: encoded once, shared by every t and ensemble member."""
        return self.adapter.encode_posterior(torch.from_numpy(pixels)[None])

    def features_for(
        self, pixels: np.ndarray, prompt: PromptEmbedding, key: str, timestep: int, ks: Sequence[int],
        posterior: LatentPosterior | None = None,
    ):
        """Ensemble-averaged features of one image at one timestep for blocks `ks`.

        `posterior` is the image's `encode` (computed here when not given). Member m's latents
        are ``posterior.sample(eps_m)``, noised with noise_m (`member_draws`); the sums run
        member by member in order, so the mean does not depend on the batch size either.
        """
        adapter, settings = self.adapter, self.settings
        posterior = posterior if posterior is not None else self.encode(pixels)
        ensemble = settings.ensemble_size
        batch = settings.batch_size or ensemble
        sums: dict[int, dict[str, torch.Tensor]] = {}
        for start in range(0, ensemble, batch):
            members = range(start, min(start + batch, ensemble))
            eps, noise = member_draws(settings.seed, key, timestep, members, tuple(posterior.mean.shape[1:]))
            latents = posterior.sample(eps if posterior.std is not None else None)
            if latents.shape[0] != len(members):  # a deterministic posterior: one row for everyone
                latents = latents.expand(len(members), *latents.shape[1:])
            noisy = adapter.add_noise(latents, noise.to(latents.device, latents.dtype), timestep)
            for k, block in adapter.forward_intermediates(noisy, prompt, timestep, ks).items():
                parts = {"pre_adaln": block.pre_adaln}
                if block.modulation is not None:  # None: a model without AdaLN
                    for name in ("shift", "scale", "gate"):
                        parts[name] = getattr(block.modulation, name)
                into = sums.setdefault(k, {})
                for name, value in parts.items():
                    for row in value.float():  # member order, whatever the batching
                        into[name] = row.clone() if name not in into else into[name].add_(row)
        extra = (
            _conditioning_variants(adapter, prompt, timestep, ks, image_size=tuple(pixels.shape[1:]))
            if adapter.has_adaln else {k: {} for k in ks}
        )
        out = {}
        for k, parts in sums.items():
            means = {name: self._mean(value, ensemble) for name, value in parts.items()}
            pre_adaln = means.pop("pre_adaln")
            if not np.isfinite(pre_adaln).all():
                raise DitfError(f"non-finite features for {key} at k={k}, t={timestep} (try --dtype fp32)")
            if np.abs(pre_adaln).max() > 65504:
                raise DitfError(f"features of {key} at k={k} overflow float16 storage")
            out[k] = (pre_adaln.astype(np.float16), {**means, **extra[k]})
        return out

    def _mean(self, total: torch.Tensor, count: int) -> np.ndarray:
        """Ensemble mean as float32 numpy; `--precision paper` rounds it to bf16 as the authors'
        ``.mean(0)`` of a bf16 batch does (fp16 storage then holds those values exactly)."""
        mean = total / count
        if self.settings.precision == "paper":
            mean = mean.to(torch.bfloat16).float()
        return mean.cpu().numpy()

    # ---- the run ----------------------------------------------------------------------------
    def run(self, dataset: Dataset, progress: bool = True, records: Sequence[ImageRecord] | None = None,
            shard: Shard | None = None) -> ExtractReport:
        """Extract every image of `dataset` (or `records`) not complete yet in every requested key.

        With `shard` (`--shard i/N`) only that shard's images are extracted, but the image index
        and the arrays are set up for all of them, so every image gets the row it would get in a
        single run and the union of the shards equals one run bit for bit.
        """
        start_time = time.perf_counter()
        adapter, settings, store = self.adapter, self.settings, self.store
        shard = shard or Shard()
        records = list(records if records is not None else dataset.images())
        if not records:
            raise DitfError(f"dataset {dataset.name} at {dataset.root} has no images")
        sizes = [image_size(record.path) for record in records]
        if dataset.task == "pairs":
            check_annotated_sizes(dataset.pairs(), records, sizes)
        # a shard owns whole blocks of ROWS_PER_SHARD rows: the small per-image arrays keep one
        # file per block, rewritten whole on each commit, so two shards must never share a block
        expected = _expected_rows(store.image_rows(dataset.name), records)
        mine = [r for r in records if shard.owns(expected[r.key] // ROWS_PER_SHARD)]
        self._check_decodable(self._pending(dataset, mine))  # a bad file fails before the index grows
        rows = store.register_images(dataset.name, [r.key for r in records], sizes)
        mine = [r for r in records if shard.owns(rows[r.key] // ROWS_PER_SHARD)]
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
                    def open_key():
                        return store.open_features(
                            dataset.name, adapter.spec.name, k, t, config=config, provenance=provenance(adapter, settings),
                            n_images=n_rows, grid_max=(rows_max, cols_max), hidden_size=channels,
                            modulation_names=modulation_names(adapter), adaln=adapter.has_adaln,
                        )

                    if shard.whole:
                        # one writer per key: a second extract into the same key is refused, not interleaved
                        locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t))
                        arrays[(k, t)] = open_key()
                    else:
                        # shards take turns only to set the key up, then write their own images side by side
                        with store.writer_lock(dataset.name, adapter.spec.name, k, t, wait=SHARD_SETUP_WAIT):
                            arrays[(k, t)] = open_key()
                        locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t, shard=str(shard)))
            return self._run_locked(dataset, mine, rows, arrays, start_time, progress)

    def _pending(self, dataset: Dataset, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """The records this run will decode: not yet complete in every requested key (read-only).

        Also refuses a key written with other settings here, before the image index grows.
        """
        rows = self.store.image_rows(dataset.name)
        config = json.loads(json.dumps(store_config(self.adapter, self.settings), default=str))
        pending, missing_key = set(), False
        for t in self.settings.ts:
            for k in self.settings.ks:
                try:
                    arrays = self.store.open_features(dataset.name, self.adapter.spec.name, k, t)
                except DitfError:  # key not created yet: every image is pending
                    missing_key = True
                    continue
                differences = config_differences(arrays.config, config)
                if differences:
                    raise DitfError(f"store {self.store.path} key {arrays.path} was written with another configuration ("
                                    + "; ".join(differences) + "): use another --store or the stored settings")
                complete = arrays.complete()
                pending.update(r.key for r in records
                               if r.key not in rows or rows[r.key] >= len(complete) or not complete[rows[r.key]])
        return list(records) if missing_key else [r for r in records if r.key in pending]

    def _check_decodable(self, records: Sequence[ImageRecord]) -> None:
        """Fully decode every image about to be extracted, before anything is written.

        Headers alone miss truncated files; a file that fails mid-run would otherwise leave a new
        index row and grown arrays behind. Decoding twice costs far less than one DiT forward.
        """
        with ThreadPoolExecutor(max_workers=max(1, self.settings.workers)) as pool:
            for _ in pool.map(lambda record: load_for_model(record.path, self.settings.resample).size, records):
                pass

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
        settings = self.settings

        def load(record: ImageRecord) -> np.ndarray:
            return self.adapter.prepare_image(
                load_for_model(record.path, settings.resample), settings.img_size, side=settings.resize,
                resample=settings.resample,
            )

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
        from ..progress import progress as progress_display

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
            bar = progress_display(len(todo), f"extract {self.adapter.spec.name}", "img", enabled=progress)
            for record, pixels in self._decoded(todo):
                row = rows[record.key]
                prompt = embeddings[texts[record.key]]
                posterior = None  # the VAE runs once per image, for every t
                for t in self.settings.ts:
                    ks = [k for k in self.settings.ks if not complete[(k, t)][row]]
                    if not ks:
                        continue
                    posterior = posterior if posterior is not None else self.encode(pixels)
                    features = self.features_for(pixels, prompt, record.key, t, ks, posterior)
                    for k, (pre_adaln, modulation) in features.items():
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


def _expected_rows(rows: dict[str, int], records: Sequence[ImageRecord]) -> dict[str, int]:
    """The rows `register_images` will give `records` (indexed keys keep theirs, new ones follow in order)."""
    expected, start = dict(rows), len(rows)
    for record in records:
        if record.key not in expected:
            expected[record.key] = start
            start += 1
    return expected
