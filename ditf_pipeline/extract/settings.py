"""The extract stage's settings, resolved: what `ditf extract` computes and how, and their checks.

`core.settings` holds what the user gave (`FeatureSettings`, `RunSettings`); `default_settings`
fills the rest from the benchmark's and the model's defaults into one `ExtractSettings`, and the
checks here run before any store is opened: a key configured with a bad value would refuse every
later valid run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import DitfError
from ..core.images import RESAMPLERS
from ..datasets.base import Dataset
from ..models.base import DiTAdapter
from .prompts import PER_IMAGE, prompts_for

__all__ = ["COMPILE_MODES", "CUDA_BATCH_IMAGES", "PRECISIONS", "ExtractSettings", "batch_images", "check_precision",
           "check_run", "check_settings", "compiles", "default_settings"]


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
#: --batch-images default on CUDA: at the default ensemble of 8 that is 32 rows per forward,
#: enough to keep a large GPU busy on small token grids (few-hundred-token images, ensemble 1
#: videos) while the activations of Flux at 640 px (about 36 bytes x rows x tokens x width,
#: 7 GiB at 32 rows) stay well inside an 80 GB card next to the 15 GiB of blocks. Not the
#: default where memory is short (--batch-size or --offload given) nor on the CPU, where
#: batching buys nothing: 1 there.
CUDA_BATCH_IMAGES = 4


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

