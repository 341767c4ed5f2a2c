"""The extract stage: each image through the DiT once, everything later stages need kept.

For every image: VAE-encode once (in fp32); for every timestep t: draw each ensemble member's
posterior sample and noise, run one forward per batch that serves every requested block k
(stopping after the deepest), average the raw pre-AdaLN z and the (shift, scale, gate) over the
ensemble, add the t-only / c-only modulation (paper Table 5), and hand the image to its sinks:
the store (`run`, committed image by image, resumable after a crash at any point) or memory
(`run_in_memory`, for `DiTF.features()` without a store).

This class orchestrates; the parts are modules of their own: `settings` (what is computed and
how, checked), `identity` (the key's configuration and the refusal to mix two), `store_keys`
(pending images, keys set up under their locks, shard ownership), `prompt_memory` (prompt
embeddings: store cache, model memory, encoders), `ensemble` (the seeds, the forward, the
means), `inputs` (decoding ahead on a pool, digests, grouping images of one token grid per
forward: `--batch-images`), `transfer` (host <-> device copies that never make the main thread
wait) and `writer` (the sinks, written on a thread of their own while the next image computes).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.errors import DitfError
from ..core.keys import FeatureKey
from ..core.shards import Shard
from ..datasets.base import Dataset, ImageRecord, check_annotated_sizes
from ..models.base import CompileOptions, DiTAdapter, LatentPosterior, PromptEmbedding
from ..store.feature_store import ROWS_PER_SHARD, FeatureStore
from . import inputs
from .ensemble import conditioning_variants, ensemble_means, image_seed, member_draws, stored_features
from .identity import adaln_names, modulation_names, store_config
from .prompt_memory import embeddings_for
from .prompts import prompts_for
from .settings import (
    COMPILE_MODES, CUDA_BATCH_IMAGES, PRECISIONS, ExtractSettings, batch_images, check_precision, check_run,
    check_settings, compiles, default_settings,
)
from .store_keys import SHARD_SETUP_WAIT, open_keys, pending_records, rows_per_file
from .transfer import HostCopies, HostCopy, upload
from .writer import FeatureSink, MemoryFeatures, WriterThread

# the names callers import from here (the stage's entry point), wherever they are defined
__all__ = ["COMPILE", "COMPILE_MODES", "CUDA_BATCH_IMAGES", "PRECISIONS", "SHARD_SETUP_WAIT", "ExtractReport",
           "ExtractSettings", "Extractor", "adaln_names", "batch_images", "check_run", "check_settings", "compiles",
           "default_settings", "image_seed", "member_draws", "modulation_names", "store_config"]

#: how the blocks are compiled when --compile resolves to on (the tests swap in "aot_eager")
COMPILE = CompileOptions()


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


class Extractor:
    """Runs one adapter over a dataset into a store (`run`) or into memory (`run_in_memory`)."""

    def __init__(self, adapter: DiTAdapter, store: FeatureStore | None, settings: ExtractSettings) -> None:
        self.adapter = adapter
        self.store = store  # None: `run_in_memory` only (prompts come from the model's memory)
        check_settings(settings, adapter.patch_stride)
        # a copy: the caller's settings stay as passed (it may run them on another adapter)
        settings = replace(settings, ks=adapter.check_indices(list(settings.ks)))
        if not adapter.stochastic:
            settings = replace(settings, ensemble_size=1)  # no noise: every ensemble member would be identical
        if not adapter.conditioned:
            settings = replace(settings, prompt="none")
        self.settings = settings
        check_precision(adapter, settings)
        adapter.set_compile(COMPILE if compiles(adapter, settings) else None)
        #: images of one token grid per forward
        self.batch_images = batch_images(adapter, settings)
        self.copies = HostCopies(adapter.device)

    # ---- prompts ------------------------------------------------------------------------------
    def encode_prompts(self, texts: set[str]) -> dict[str, PromptEmbedding]:
        """Embeddings for every prompt, encoding (and caching) only the missing ones (`embeddings_for`)."""
        return embeddings_for(self.adapter, self.store, texts)

    # ---- one image, or images of one grid ------------------------------------------------------
    def encode(self, pixels: np.ndarray | torch.Tensor) -> LatentPosterior:
        """The VAE posterior of one image: encoded once, shared by every t and ensemble member."""
        pixels = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        return self.adapter.encode_posterior(upload(pixels, self.adapter.device)[None])

    def device_prompt(self, prompt: PromptEmbedding) -> PromptEmbedding:
        """A prompt embedding queued to the adapter's device (no wait: pinned, non-blocking)."""
        return {name: upload(value, self.adapter.device) for name, value in prompt.items()}

    def features_for(
        self, pixels: np.ndarray, prompt: PromptEmbedding, key: str, timestep: int, ks: Sequence[int],
        posterior: LatentPosterior | None = None,
    ):
        """Ensemble-averaged features of one image at one timestep for blocks `ks`, on the host:
        {k: (z as float16 (h, w, D), {"shift": ..., "scale": ..., ...} float32)}.

        `posterior` is the image's `encode` (computed here when not given). Member m's latents
        are ``posterior.sample(eps_m)``, noised with noise_m (`member_draws`); the sums run
        member by member in order, so the mean does not depend on the batch size either.
        """
        posterior = posterior if posterior is not None else self.encode(pixels)
        prompt = self.device_prompt(prompt)
        means = self.ensemble_means([(key, posterior, prompt)], timestep, ks)[0]
        extra = conditioning_variants(self.adapter, prompt, timestep, ks, tuple(pixels.shape[1:]))
        return stored_features(key, timestep, ks, self._copy_to_host(means, extra).wait())

    def ensemble_means(
        self, images: Sequence[tuple[str, LatentPosterior, PromptEmbedding]], timestep: int, ks: Sequence[int],
    ) -> list[dict[int, dict[str, torch.Tensor]]]:
        """`ensemble.ensemble_means` with this extractor's adapter and settings."""
        return ensemble_means(self.adapter, self.settings, images, timestep, ks)

    def _copy_to_host(self, means: dict[int, dict[str, torch.Tensor]], extra: dict) -> HostCopy:
        """Start copying one image's means and conditioning variants to the host ("k/name" keys)."""
        return self.copies.start({f"{k}/{name}": value for k, parts in means.items()
                                  for name, value in {**parts, **extra[k]}.items()})

    # ---- the run into the store ---------------------------------------------------------------
    def run(self, dataset: Dataset, progress: bool = True, records: Sequence[ImageRecord] | None = None,
            shard: Shard | None = None) -> ExtractReport:
        """Extract every image of `dataset` (or `records`) not complete yet in every requested key.

        With `shard` (`--shard i/N`) only that shard's images are extracted, but the image index
        and the arrays are set up for all of them, so every image gets the row it would get in a
        single run and the union of the shards equals one run bit for bit.
        """
        start_time = time.perf_counter()
        if self.store is None:
            raise DitfError("this extractor has no store: use run_in_memory")
        records = self._prepare(dataset, records)
        store, shard = self.store, shard or Shard()
        sizes = dataset.image_sizes(records)
        if dataset.task == "pairs":
            check_annotated_sizes(dataset.pairs(), records, sizes)
        # a shard owns whole blocks of ROWS_PER_SHARD rows: the small per-image arrays keep one
        # file per block, rewritten whole on each commit, so two shards must never share a block
        expected = inputs.expected_rows(store.image_rows(dataset.name), records)
        mine = [r for r in records if shard.owns(expected[r.key] // ROWS_PER_SHARD)]
        pending = {r.key for r in pending_records(store, self.adapter, self.settings, dataset, mine)}
        # every image is decoded (a bad file fails before the index grows) and its pixels digested:
        # a name reused for other pixels is refused, never served the features of the old image
        digests = inputs.digests(records, pending, self.settings)
        keys = [r.key for r in records]
        store.check_identities(dataset.name, keys, sizes, digests)
        rows = store.register_images(dataset.name, keys, sizes, digests)
        with contextlib.ExitStack() as locks:
            arrays = open_keys(store, self.adapter, self.settings, dataset, sizes, len(rows), shard, locks, COMPILE)
            # ownership follows the keys' files as created (never this run's environment)
            block = rows_per_file(arrays)
            mine = [r for r in records if shard.owns(rows[r.key] // block)]
            return self._run_locked(dataset, mine, rows, arrays, start_time, progress)

    def _prepare(self, dataset: Dataset, records: Sequence[ImageRecord] | None) -> list[ImageRecord]:
        """The records to run (all of `dataset` unless given), with the dataset's EXIF rule taken."""
        if self.settings.exif_transpose != dataset.exif_transpose:  # a copy: the caller's settings stay as given
            self.settings = replace(self.settings, exif_transpose=dataset.exif_transpose)
        records = list(records if records is not None else dataset.images())
        if not records:
            raise DitfError(f"dataset {dataset.name} at {dataset.root} has no images")
        return records

    def _run_locked(self, dataset, records, rows, arrays, start_time, progress) -> ExtractReport:
        complete = {key: array.complete() for key, array in arrays.items()}
        todo = [r for r in records if not all(complete[key][rows[r.key]] for key in arrays)]
        report = ExtractReport(
            store=str(self.store.path), keys=[a.path for a in arrays.values()], n_images=len(records),
            extracted=len(todo), skipped=len(records) - len(todo), seconds=0.0,
        )
        if todo:
            texts = prompts_for(todo, self.settings.prompt)
            embeddings = self.encode_prompts(set(texts.values()))
            self._extract(todo, rows, texts, embeddings, arrays, complete, progress)
        report.seconds = time.perf_counter() - start_time
        return report

    # ---- the run into memory ------------------------------------------------------------------
    def run_in_memory(self, dataset: Dataset, progress: bool = False) -> tuple[dict[str, int], dict[tuple[int, int], MemoryFeatures]]:
        """Extract every image of `dataset` into memory: (row of each image key, a `MemoryFeatures` per (k, t)).

        The same arithmetic and the same float16 z as `run` (the sinks differ, nothing else), with
        nothing written anywhere: no image index, no locks, prompts from the model's memory only.
        Image keys must be distinct (the API makes them so).
        """
        adapter, records = self.adapter, self._prepare(dataset, None)
        rows = {record.key: row for row, record in enumerate(records)}
        if len(rows) != len(records):
            raise DitfError("run_in_memory: two images share a key")
        config = store_config(adapter, self.settings)
        names = (adaln_names(adapter) if adapter.has_adaln else []) + modulation_names(adapter)
        sinks = {(k, t): MemoryFeatures(FeatureKey(dataset.name, adapter.spec.name, k, t).path, len(records),
                                        adapter.feature_shape(self.settings.img_size, k)[2], names, config,
                                        image_key=lambda row: records[row].key)
                 for t in self.settings.ts for k in self.settings.ks}
        texts = prompts_for(records, self.settings.prompt)
        embeddings = self.encode_prompts(set(texts.values()))
        complete = {key: sink.complete() for key, sink in sinks.items()}
        self._extract(records, rows, texts, embeddings, sinks, complete, progress)
        return rows, sinks

    # ---- the image loop, whatever the sinks ---------------------------------------------------
    def _extract(self, todo, rows, texts, embeddings, sinks: Mapping[tuple[int, int], FeatureSink], complete,
                 progress) -> None:
        """Every image of `todo` through the DiT at every t, its features into `sinks[(k, t)]` at
        its row (`complete` says which (image, key) to skip)."""
        from ..core.progress import progress as progress_display

        writer = WriterThread(depth=2 * self.batch_images + 2)
        # each distinct prompt goes to the device once per run (a category's images share one),
        # not once per image: a pinned staging copy and an upload per image bought nothing
        on_device: dict[str, PromptEmbedding] = {}

        def device_prompt(text: str) -> PromptEmbedding:
            if text not in on_device:
                on_device[text] = self.device_prompt(embeddings[text])
            return on_device[text]

        adapter, settings = self.adapter, self.settings
        try:
            bar = progress_display(len(todo), f"extract {adapter.spec.name}", "img", enabled=progress)
            ordered = inputs.ordered(adapter, settings, todo, self.batch_images)
            decoded = inputs.decoded(adapter, settings, ordered, self.batch_images)
            for group in inputs.groups(decoded, texts, embeddings, self.batch_images):
                images = [inputs.QueuedImage(record, rows[record.key], upload(pixels, adapter.device),
                                             device_prompt(texts[record.key])) for record, pixels in group]
                for t in settings.ts:
                    wanted = [(image, [k for k in settings.ks if not complete[(k, t)][image.row]]) for image in images]
                    wanted = [(image, ks) for image, ks in wanted if ks]
                    if not wanted:
                        continue
                    for image, _ in wanted:  # the VAE runs once per image, for every t
                        image.posterior = image.posterior if image.posterior is not None else self.encode(image.pixels)
                    ks_run = sorted({k for _, ks in wanted for k in ks})
                    means = self.ensemble_means([(image.record.key, image.posterior, image.prompt) for image, _ in wanted],
                                                t, ks_run)
                    for (image, ks), mean in zip(wanted, means):
                        extra = conditioning_variants(adapter, image.prompt, t, ks, tuple(image.pixels.shape[1:]))
                        copy = self._copy_to_host({k: mean[k] for k in ks}, extra)
                        writer.put(functools.partial(self._commit, image, t, ks, copy, sinks))
                bar.update(len(group))
            bar.close()
        finally:
            writer.close()
        writer.check()

    def _commit(self, image: inputs.QueuedImage, timestep: int, ks: Sequence[int], copy: HostCopy,
                sinks: Mapping[tuple[int, int], FeatureSink]) -> None:
        """On the writer thread: wait for one image's copy to land, check it, write it (in the
        store, the commit mark of each key last, in `write_image`)."""
        features = stored_features(image.record.key, timestep, ks, copy.wait())
        for k, (pre_adaln, modulation) in features.items():
            sinks[(k, timestep)].write_image(image.row, pre_adaln, modulation)
