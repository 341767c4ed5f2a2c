"""The extract stage: each image through the DiT once, everything later stages need cached.

For every image: VAE-encode once (in fp32); for every timestep t: draw each ensemble member's
posterior sample and noise (seeded by image key, t and member, so a rerun is bit-identical
whatever the batch size), run one forward per batch that serves every requested block k
(stopping after the deepest), average the raw pre-AdaLN z and the (shift, scale, gate) over the
ensemble, add the t-only / c-only modulation (paper Table 5), and commit the image to the store.

The GPU path is lean: images of the same token grid share a forward (`--batch-images`: rows =
images x ensemble members, each image's noise still seeded by its own key), the blocks that run
are compiled (`--compile`), and the main thread never waits for the GPU: pixels, noise and
prompts go up through pinned memory without blocking, the ensemble means come back on a side
stream (`transfer`), and the store writer thread waits for each copy and commits image i while
image i+1 computes. Images are decoded ahead of the DiT on a thread pool. Each image is still
committed on its own, in order, so the run is resumable after a crash at any point.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.version import SCHEMA_VERSION, __version__
from ..datasets.base import Dataset, ImageRecord, check_annotated_sizes
from ..core.errors import DitfError
from ..core.images import RESAMPLERS, image_size, load_for_model, orientation_label, pixel_digest
from ..models.base import CompileOptions, DiTAdapter, LatentPosterior, PromptEmbedding
from .prompt_memory import PromptMemory
from .prompts import PER_IMAGE, prompt_identity, prompts_for
from .transfer import HostCopies, HostCopy, pinned, upload
from ..core.shards import Shard
from ..store.feature_store import ROWS_PER_SHARD, FeatureArrays, FeatureStore, config_differences
from ..store.schema import file_rows


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
    # the EXIF orientation tag applied (photos) or ignored (annotated benchmarks): always the
    # dataset's rule (`Dataset.exif_transpose`), which `Extractor.run` puts here
    exif_transpose: bool = True
    # how the work runs, not what it computes: provenance only, never the key's config
    compile: str = "auto"  # `COMPILE_MODES`: torch.compile the DiT blocks that run
    batch_images: int | None = None  # images of one token grid per forward; None: `batch_images()`


#: --precision: "default" runs the DiT in the dtype asked for, averages the ensemble in fp32 and
#: stores z as fp16 (matching then computes in fp32); "paper" is the authors' bf16 path: the DiT
#: in bf16 (so timestep and guidance embeddings are rounded in bf16, 3500 -> 3504), ensemble
#: means rounded to bf16 (their `.mean(0)` of a bf16 batch), and at match time the variant in
#: bf16, cast to fp16, upsampled and compared in fp16 (`ditf_pipeline.match.paper`).
PRECISIONS = ("default", "paper")
#: --compile: "auto" compiles on CUDA (not with --offload) and runs eagerly on the CPU, where
#: compiled blocks took more CPU time per image on tiny-flux (benchmarks/results/bench_extract-lean-*)
COMPILE_MODES = ("auto", "on", "off")
#: how the blocks are compiled when --compile resolves to on (the tests swap in "aot_eager")
COMPILE = CompileOptions()
#: --batch-images default on CUDA: at the default ensemble of 8 that is 32 rows per forward,
#: enough to keep a large GPU busy on small token grids (few-hundred-token images, ensemble 1
#: videos) while the activations of Flux at 640 px (about 36 bytes x rows x tokens x width,
#: 7 GiB at 32 rows) stay well inside an 80 GB card next to the 15 GiB of blocks. Not the
#: default where memory is short (--batch-size or --offload given) nor on the CPU, where
#: batching buys nothing: 1 there.
CUDA_BATCH_IMAGES = 4
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
    if prompt not in ("template", "none", PER_IMAGE) and not prompt.startswith(("captions:", "text:")):
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
        batch_images=given.get("batch_images"),
        compile=given.get("compile", "auto"),
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
    check_at_least("--batch-images", settings.batch_images)
    check_choice("--compile", settings.compile, COMPILE_MODES)
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


def compiles(adapter: DiTAdapter, settings: ExtractSettings) -> bool:
    """Whether --compile resolves to on for this adapter (auto: on CUDA, without --offload)."""
    if settings.compile == "auto":
        return adapter.device.type == "cuda" and not adapter.offload
    if settings.compile == "on" and adapter.offload:
        raise DitfError("--compile on cannot be combined with --offload (the streamed blocks move between host and "
                        "device on every call); use --compile off or auto")
    return settings.compile == "on"


def batch_images(adapter: DiTAdapter, settings: ExtractSettings) -> int:
    """--batch-images, or its default: `CUDA_BATCH_IMAGES` on CUDA, 1 on the CPU and when
    --batch-size or --offload says GPU memory is short."""
    if settings.batch_images is not None:
        return settings.batch_images
    short = settings.batch_size is not None or adapter.offload
    return CUDA_BATCH_IMAGES if adapter.device.type == "cuda" and not short else 1


def check_run(adapter: DiTAdapter, settings: ExtractSettings, dataset: Dataset | None = None) -> None:
    """Everything an extract can check before it opens the store: settings, block indices
    for this model and, with `dataset`, the annotations (parsed and checked by the reader)."""
    check_settings(settings, adapter.patch_stride)
    check_precision(adapter, settings)
    compiles(adapter, settings)
    adapter.check_indices(settings.ks)
    if dataset is not None:
        records = dataset.images()
        if settings.prompt == PER_IMAGE:  # every image carries its prompt, named in its key
            prompts_for(records, PER_IMAGE)


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
        "orientation": orientation_label(settings.exif_transpose),
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


def comparable_config(config: dict, stored: dict | None) -> dict:
    """`config` as it is compared with a key's `stored` config.

    A key whose config does not record the orientation read every image with the EXIF tag
    applied; for every file without an orientation tag (the benchmarks' images) that is the
    same pixels, so such a key is resumed as it is, and keeps its config.
    """
    if stored is not None and "orientation" not in stored:
        return {name: value for name, value in config.items() if name != "orientation"}
    return config


def provenance(adapter: DiTAdapter, settings: ExtractSettings) -> dict:
    from importlib.metadata import version

    import diffusers
    import transformers

    return {
        "ditf": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "zarr": version("zarr"),  # read from the metadata: only store/ imports zarr
        "python": platform.python_version(),
        "device": str(adapter.device),
        "text_device": str(adapter.text_device),
        "offload": adapter.offload,
        "batch_size": settings.batch_size,
        "batch_images": batch_images(adapter, settings),
        "compile": f"{COMPILE.backend} (per block)" if compiles(adapter, settings) else "off",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _conditioning_variants(
    adapter: DiTAdapter, prompt: PromptEmbedding, timestep: int, ks: Sequence[int], image_size: tuple[int, int]
) -> dict:
    """{k: {"shift_t": ..., "scale_t": ..., ...}} for the conditioning ablation, where defined
    (float32 tensors where the adapter runs: they go to the host with the features)."""
    out: dict[int, dict[str, torch.Tensor]] = {k: {} for k in ks}
    for conditioning in ("t", "c"):
        try:
            mods = adapter.modulation(prompt, timestep, ks, conditioning, image_size=image_size)
        except DitfError:
            continue  # e.g. PixArt: AdaLN sees t only, no c-only variant
        for k, mod in mods.items():
            for name, value in mod.vectors().items():
                if name != "norm_weight":  # the norm's weight is the same whatever the conditioning
                    out[k][f"{name}_{conditioning}"] = value.float()
    return out


def adaln_names(adapter: DiTAdapter) -> list[str]:
    """The vectors each block's modulation stores: shift, scale, gate after a LayerNorm; scale,
    gate and the norm's learned weight after a scale-only RMSNorm (no shift is stored at all)."""
    return ["shift", "scale", "gate"] if adapter.modulated_norm == "layer" else ["scale", "gate", "norm_weight"]


def modulation_names(adapter: DiTAdapter) -> list[str]:
    """The conditioning-ablation vectors stored besides `adaln_names`."""
    if not adapter.has_adaln:
        return []
    base = [name for name in adaln_names(adapter) if name != "norm_weight"]
    names = [f"{name}_t" for name in base]
    if adapter.separates_conditioning:
        names += [f"{name}_c" for name in base]
    return names


def _rows_per_file(arrays: Mapping[tuple[int, int], FeatureArrays]) -> int:
    """Images per file of the keys' small per-image arrays: a shard owns whole files of them.

    Read from each key's `complete` array as it was created, so every shard of a key agrees on
    ownership whatever DITF_ROWS_PER_SHARD says now.
    """
    sizes = {file_rows(a.group["complete"]) for a in arrays.values()}
    if len(sizes) > 1:
        raise DitfError("the keys of this run keep different numbers of images per file ("
                        + ", ".join(f"{a.path}: {file_rows(a.group['complete'])}" for a in arrays.values())
                        + "): run --shard separately for each --k / --t")
    return sizes.pop() if sizes else ROWS_PER_SHARD


class Extractor:
    """Runs one adapter over a dataset into a store."""

    def __init__(self, adapter: DiTAdapter, store: FeatureStore, settings: ExtractSettings) -> None:
        self.adapter = adapter
        self.store = store
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
        """Embeddings for every prompt, encoding (and caching) only the missing ones."""
        adapter = self.adapter
        cache = self.store.prompt_cache(
            adapter.spec.name,
            {"source": adapter.source, "revision": adapter.revision, "dtype": str(adapter.dtype), "model": adapter.spec.name},
        )
        found = cache.get_many(texts)
        # a model object kept across runs (the Python API) remembers what it encoded before
        memory: PromptMemory | None = getattr(adapter, "prompt_memory", None)
        if memory is not None:
            for text, embedding in memory.get_many(texts - set(found)).items():
                cache.put(text, embedding)
                found[text] = embedding
        missing = sorted(texts - set(found))
        if missing:
            for text, embedding in zip(missing, adapter.encode_prompts(missing)):
                numpy_embedding = {name: value.float().numpy() for name, value in embedding.items()}
                cache.put(text, numpy_embedding)
                found[text] = numpy_embedding
            adapter.release_text_encoders()
        if memory is not None:
            for text, embedding in found.items():
                memory.put(text, embedding)
        return {text: {name: torch.from_numpy(np.asarray(v)) for name, v in emb.items()} for text, emb in found.items()}

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
        extra = self._extras(prompt, timestep, ks, tuple(pixels.shape[1:]))
        return self._checked(key, timestep, ks, self._copy_to_host(means, extra).wait())

    def ensemble_means(
        self, images: Sequence[tuple[str, LatentPosterior, PromptEmbedding]], timestep: int, ks: Sequence[int],
    ) -> list[dict[int, dict[str, torch.Tensor]]]:
        """Per image (key, posterior, prompt) of one token grid: {k: {"pre_adaln": (h, w, D), "shift": (D,), ...}},
        float32 ensemble means where the adapter runs (nothing is waited for).

        All images go through each forward together: rows = images x the members of the batch,
        image-major. Each image's members are drawn from its own seeds and summed in member
        order, so an image's numbers do not depend on which images share its forward, up to the
        last bits of the DiT's batched matrix products.
        """
        adapter, settings = self.adapter, self.settings
        device = adapter.device
        ensemble = settings.ensemble_size
        batch = settings.batch_size or ensemble
        n = len(images)
        sums: dict[int, dict[str, torch.Tensor]] = {}
        for start in range(0, ensemble, batch):
            members = range(start, min(start + batch, ensemble))
            rows = []
            for key, posterior, _ in images:
                eps, noise = member_draws(settings.seed, key, timestep, members, tuple(posterior.mean.shape[1:]))
                latents = posterior.sample(upload(eps, device) if posterior.std is not None else None)
                if latents.shape[0] != len(members):  # a deterministic posterior: one row for everyone
                    latents = latents.expand(len(members), *latents.shape[1:])
                rows.append(adapter.add_noise(latents, upload(noise, device).to(latents.dtype), timestep))
            prompts = [prompt for _, _, prompt in images]
            noisy = rows[0] if n == 1 else torch.cat(rows)
            for k, block in adapter.forward_intermediates(noisy, prompts[0] if n == 1 else prompts, timestep, ks).items():
                parts = {"pre_adaln": block.pre_adaln}
                if block.modulation is not None:  # None: a model without AdaLN
                    parts.update(block.modulation.vectors())
                into = sums.setdefault(k, {})
                for name, value in parts.items():
                    value = value.float().reshape(n, len(members), *value.shape[1:])
                    for member in range(len(members)):  # member order, whatever the batching
                        row = value[:, member]
                        into[name] = row.clone() if name not in into else into[name].add_(row)
        return [{k: {name: self._mean(total[i], ensemble) for name, total in parts.items()} for k, parts in sums.items()}
                for i in range(n)]

    def _mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """Ensemble mean in float32; `--precision paper` rounds it to bf16 as the authors'
        ``.mean(0)`` of a bf16 batch does (fp16 storage then holds those values exactly)."""
        mean = total / count
        if self.settings.precision == "paper":
            mean = mean.to(torch.bfloat16).float()
        return mean

    def _extras(self, prompt: PromptEmbedding, timestep: int, ks: Sequence[int], image_size: tuple[int, int]) -> dict:
        """The t-only / c-only modulation of blocks `ks` (none for models without AdaLN)."""
        if not self.adapter.has_adaln:
            return {k: {} for k in ks}
        return _conditioning_variants(self.adapter, prompt, timestep, ks, image_size=image_size)

    def _copy_to_host(self, means: dict[int, dict[str, torch.Tensor]], extra: dict) -> HostCopy:
        """Start copying one image's means and conditioning variants to the host ("k/name" keys)."""
        return self.copies.start({f"{k}/{name}": value for k, parts in means.items()
                                  for name, value in {**parts, **extra[k]}.items()})

    def _checked(self, key: str, timestep: int, ks: Sequence[int], host: dict[str, np.ndarray]) -> dict:
        """{k: (z as float16, modulation)} from one image's host arrays, refusing what float16 cannot hold."""
        out = {}
        for k in ks:
            pre_adaln = host[f"{k}/pre_adaln"]
            if not np.isfinite(pre_adaln).all():
                raise DitfError(f"non-finite features for {key} at k={k}, t={timestep} (try --dtype fp32)")
            if np.abs(pre_adaln).max() > 65504:
                raise DitfError(f"features of {key} at k={k} overflow float16 storage")
            prefix = f"{k}/"
            modulation = {name[len(prefix):]: value for name, value in host.items()
                          if name.startswith(prefix) and name != f"{k}/pre_adaln"}
            out[k] = (pre_adaln.astype(np.float16), modulation)
        return out

    # ---- the run ----------------------------------------------------------------------------
    def run(self, dataset: Dataset, progress: bool = True, records: Sequence[ImageRecord] | None = None,
            shard: Shard | None = None) -> ExtractReport:
        """Extract every image of `dataset` (or `records`) not complete yet in every requested key.

        With `shard` (`--shard i/N`) only that shard's images are extracted, but the image index
        and the arrays are set up for all of them, so every image gets the row it would get in a
        single run and the union of the shards equals one run bit for bit.
        """
        start_time = time.perf_counter()
        if self.settings.exif_transpose != dataset.exif_transpose:  # a copy: the caller's settings stay as given
            self.settings = replace(self.settings, exif_transpose=dataset.exif_transpose)
        adapter, settings, store = self.adapter, self.settings, self.store
        shard = shard or Shard()
        records = list(records if records is not None else dataset.images())
        if not records:
            raise DitfError(f"dataset {dataset.name} at {dataset.root} has no images")
        sizes = dataset.image_sizes(records)
        if dataset.task == "pairs":
            check_annotated_sizes(dataset.pairs(), records, sizes)
        # a shard owns whole blocks of ROWS_PER_SHARD rows: the small per-image arrays keep one
        # file per block, rewritten whole on each commit, so two shards must never share a block
        expected = _expected_rows(store.image_rows(dataset.name), records)
        mine = [r for r in records if shard.owns(expected[r.key] // ROWS_PER_SHARD)]
        pending = {r.key for r in self._pending(dataset, mine)}
        # every image is decoded (a bad file fails before the index grows) and its pixels digested:
        # a name reused for other pixels is refused, never served the features of the old image
        digests = self._digests(records, pending)
        keys = [r.key for r in records]
        store.check_identities(dataset.name, keys, sizes, digests)
        rows = store.register_images(dataset.name, keys, sizes, digests)
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
                        try:
                            stored = store.open_features(dataset.name, adapter.spec.name, k, t).config
                        except DitfError:  # not set up yet
                            stored = None
                        return store.open_features(
                            dataset.name, adapter.spec.name, k, t, config=comparable_config(config, stored),
                            provenance=provenance(adapter, settings),
                            n_images=n_rows, grid_max=(rows_max, cols_max), hidden_size=channels,
                            modulation_names=modulation_names(adapter), adaln=adapter.has_adaln,
                            adaln_names=adaln_names(adapter),
                        )

                    if shard.whole:
                        # one writer per key: a second extract into the same key is refused, not interleaved
                        locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t))
                        arrays[(k, t)] = open_key()
                    else:
                        # shards take turns only to set the key up, then write their own images side by side
                        with store.setup_lock(dataset.name, adapter.spec.name, k, t, wait=SHARD_SETUP_WAIT):
                            arrays[(k, t)] = open_key()
                        locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t, shard=str(shard)))
            # ownership follows the keys' files as created (never this run's environment)
            block = _rows_per_file(arrays)
            mine = [r for r in records if shard.owns(rows[r.key] // block)]
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
                differences = config_differences(arrays.config, comparable_config(config, arrays.config))
                if differences:
                    raise DitfError(f"store {self.store.path} key {arrays.path} was written with another configuration ("
                                    + "; ".join(differences) + "): use another --store or the stored settings")
                complete = arrays.complete()
                pending.update(r.key for r in records
                               if r.key not in rows or rows[r.key] >= len(complete) or not complete[rows[r.key]])
        return list(records) if missing_key else [r for r in records if r.key in pending]

    def _digests(self, records: Sequence[ImageRecord], pending: set[str]) -> list[str]:
        """`pixel_digest` of every record, decoding each fully before anything is written.

        Headers alone miss truncated files; a file that fails mid-run would otherwise leave a new
        index row and grown arrays behind. Decoding costs far less than one DiT forward. A file
        that cannot be decoded fails here if it is `pending` (about to be extracted); an already
        complete one that no longer decodes gets no digest (its size is still compared).
        """
        def digest(record: ImageRecord) -> str:
            try:
                return pixel_digest(load_for_model(record.path, self.settings.resample,
                                                   exif_transpose=self.settings.exif_transpose))
            except DitfError:
                if record.key in pending:
                    raise
                return ""

        with ThreadPoolExecutor(max_workers=max(1, self.settings.workers)) as pool:
            return list(pool.map(digest, records))

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

    def _decoded(self, records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, torch.Tensor]]:
        """Decode and preprocess images ahead of the DiT (bounded lookahead), as (3, H, W) float32
        tensors, already in pinned memory when they go to a GPU (the pinning runs in the pool)."""
        settings, device = self.settings, self.adapter.device

        def load(record: ImageRecord) -> torch.Tensor:
            pixels = self.adapter.prepare_image(
                load_for_model(record.path, settings.resample, exif_transpose=settings.exif_transpose),
                settings.img_size, side=settings.resize,
                resample=settings.resample,
            )
            return pinned(torch.from_numpy(pixels), device)

        with ThreadPoolExecutor(max_workers=max(1, self.settings.workers)) as pool:
            lookahead = max(2 * max(1, self.settings.workers), 2 * self.batch_images)
            futures = [pool.submit(load, r) for r in records[:lookahead]]
            for i, record in enumerate(records):
                pixels = futures[i].result()
                if i + lookahead < len(records):
                    futures.append(pool.submit(load, records[i + lookahead]))
                futures[i] = None
                yield record, pixels

    def _ordered(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """With --batch-images > 1, images of one token grid next to each other (stable order
        otherwise), so they can share forwards; grids come from the headers, nothing is decoded."""
        if self.batch_images == 1:
            return list(records)
        settings = self.settings

        def grid(record: ImageRecord) -> tuple[int, int]:
            width, height = image_size(record.path, exif_transpose=settings.exif_transpose)
            return self.adapter.grid_size(width, height, settings.img_size, settings.resize)

        return sorted(records, key=grid)

    def _groups(self, decoded, texts: dict[str, str], embeddings: dict[str, PromptEmbedding]):
        """Consecutive decoded images that can share a forward: same pixel size (so same token
        grid) and prompt embeddings of the same shapes, at most `batch_images` of them."""
        group: list[tuple[ImageRecord, torch.Tensor]] = []
        signature = None
        for record, pixels in decoded:
            prompt = embeddings[texts[record.key]]
            mine = (tuple(pixels.shape), tuple(sorted((name, tuple(value.shape)) for name, value in prompt.items())))
            if group and (mine != signature or len(group) == self.batch_images):
                yield group
                group = []
            group.append((record, pixels))
            signature = mine
        if group:
            yield group

    def _extract(self, todo, rows, texts, embeddings, arrays, complete, progress) -> None:
        from ..core.progress import progress as progress_display

        writer = _StoreWriter(depth=2 * self.batch_images + 2)
        # each distinct prompt goes to the device once per run (a category's images share one),
        # not once per image: a pinned staging copy and an upload per image bought nothing
        on_device: dict[str, PromptEmbedding] = {}

        def device_prompt(text: str) -> PromptEmbedding:
            if text not in on_device:
                on_device[text] = self.device_prompt(embeddings[text])
            return on_device[text]

        try:
            bar = progress_display(len(todo), f"extract {self.adapter.spec.name}", "img", enabled=progress)
            for group in self._groups(self._decoded(self._ordered(todo)), texts, embeddings):
                images = [_Image(record, rows[record.key], upload(pixels, self.adapter.device),
                                 device_prompt(texts[record.key])) for record, pixels in group]
                for t in self.settings.ts:
                    wanted = [(image, [k for k in self.settings.ks if not complete[(k, t)][image.row]]) for image in images]
                    wanted = [(image, ks) for image, ks in wanted if ks]
                    if not wanted:
                        continue
                    for image, _ in wanted:  # the VAE runs once per image, for every t
                        image.posterior = image.posterior if image.posterior is not None else self.encode(image.pixels)
                    ks_run = sorted({k for _, ks in wanted for k in ks})
                    means = self.ensemble_means([(image.record.key, image.posterior, image.prompt) for image, _ in wanted],
                                                t, ks_run)
                    for (image, ks), mean in zip(wanted, means):
                        extra = self._extras(image.prompt, t, ks, tuple(image.pixels.shape[1:]))
                        copy = self._copy_to_host({k: mean[k] for k in ks}, extra)
                        writer.put(functools.partial(self._commit, image, t, ks, copy, arrays))
                bar.update(len(group))
            bar.close()
        finally:
            writer.close()
        writer.check()

    def _commit(self, image: "_Image", timestep: int, ks: Sequence[int], copy: HostCopy, arrays) -> None:
        """On the writer thread: wait for one image's copy to land, check it, write it (the
        commit mark of each key last, in `write_image`)."""
        features = self._checked(image.record.key, timestep, ks, copy.wait())
        for k, (pre_adaln, modulation) in features.items():
            arrays[(k, timestep)].write_image(image.row, pre_adaln, modulation)


@dataclass
class _Image:
    """One image of a group: where it goes in the store, its pixels and prompt on the device,
    and its VAE posterior once encoded (shared by every t)."""

    record: ImageRecord
    row: int
    pixels: torch.Tensor
    prompt: PromptEmbedding
    posterior: LatentPosterior | None = None


class _StoreWriter:
    """Store writes on one thread, one at a time, in the order queued.

    The first failure is kept, later jobs are skipped, and the main thread raises that one
    error (`check`, called on every `put` and after `close`). The bounded queue holds back a
    main thread that runs ahead of the writes, so at most `depth` images wait in host memory.
    """

    def __init__(self, depth: int) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ditf-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.failure is not None:
                continue
            try:
                job()
            except BaseException as exc:  # raised on the main thread
                self.failure = exc

    def put(self, job) -> None:
        self.check()
        self.jobs.put(job)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def _expected_rows(rows: dict[str, int], records: Sequence[ImageRecord]) -> dict[str, int]:
    """The rows `register_images` will give `records` (indexed keys keep theirs, new ones follow in order)."""
    expected, start = dict(rows), len(rows)
    for record in records:
        if record.key not in expected:
            expected[record.key] = start
            start += 1
    return expected
