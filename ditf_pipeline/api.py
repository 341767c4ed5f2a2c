"""DiTF from Python: `DiTF.from_pretrained(...).features(images)` and `open_store(path).features(...)`.

This is the command line's own path, not a second one: `DiTF.features` hands the images to
`pipeline.run_extract` (what `ditf extract` calls) as an in-memory image list into the store
given, or without `store=` to `pipeline.extract_in_memory` (the same extractor and arithmetic,
its features kept in memory as the store would hold them, float16 z included, nothing written),
and reads each variant back with the match stage's own `FeatureCache` and `resolve_channels`.
The same image with the same settings therefore gives bit-identical features with and without
a store, and through `ditf extract --dataset folder` (under the same key).

Identity is content: an image's store key is a digest of its decoded pixels (`image_key`), unless
the caller names it (`keys=`), so two images never share a row whatever their file names, and
the same pixels are found again under any name. Pixel values are never clipped: float inputs
are read in a declared `value_range` ((0, 1) unless told) and anything outside it, NaN or inf
is refused with one error line.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .core.errors import DitfError
from .datasets.base import Dataset, ImageRecord

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .models.base import DiTAdapter

#: What `DiTF.features` accepts per image: a path, a PIL image, an (H, W, 3) / (H, W) array, a
#: torch tensor laid out (3, H, W), (H, W, 3) or (H, W), or a batch (B, 3, H, W) / (B, H, W, 3)
#: standing for B images. uint8 values are 0..255; float values are read in `value_range`.
ImageLike = Union[str, Path, "Image.Image", np.ndarray, "torch.Tensor"]

#: A prompt: one text (or prompt mode) for every image, one text per image, or a function of
#: the image (as given) returning its text.
PromptLike = Union[str, Sequence[str], Callable[[Any], str], None]

#: The store's dataset name for images given to the API: the same as `ditf extract --dataset
#: folder`, so a store filled by either is reused by the other under the same keys.
API_DATASET = "folder"

#: value ranges with a name in the docs; any (low, high) with low < high is accepted
VALUE_RANGES = {"(0, 1)": (0.0, 1.0), "(-1, 1)": (-1.0, 1.0), "(0, 255)": (0.0, 255.0)}

#: the CLI's prompt modes, kept as modes; any other text is one literal prompt per image
_PROMPT_MODES = ("template", "none")

__all__ = ["API_DATASET", "DiTF", "FeatureStoreReader", "ImageLike", "PromptLike", "image_key", "open_store",
           "resolve_model"]


class _ImageList(Dataset):
    """The images of one `DiTF.features` call, as a dataset the extractor can run."""

    name = API_DATASET
    alphas = ()
    threshold_rule = "none (unannotated images)"

    def __init__(self, records: list[ImageRecord]) -> None:
        super().__init__(Path("."), None)
        self._records = records

    def images(self) -> list[ImageRecord]:
        return list(self._records)


# ---- pixels ---------------------------------------------------------------------------------------
def _check_range(value_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if value_range is None:
        return None
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise DitfError(f"value_range must be two numbers (low, high), e.g. (0, 1) or (-1, 1); got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DitfError(f"value_range must be finite with low < high, got {value_range!r}")
    return low, high


def _as_numpy(image: Any) -> np.ndarray:
    """A torch tensor as a numpy array (half and bfloat16 widened to float32, exactly)."""
    import torch

    if image.device.type == "meta":
        raise DitfError("an image tensor on the meta device holds no values")
    if image.is_complex() or image.dtype == torch.bool:
        raise DitfError(f"an image tensor must be uint8 or floating point, got {str(image.dtype).replace('torch.', '')}")
    if image.dtype in (torch.bfloat16, torch.float16):
        image = image.float()
    return image.detach().cpu().numpy()


def _batch(image: Any) -> list[Any]:
    """A (B, 3, H, W) / (B, H, W, 3) tensor or array as its B images; any other input as itself."""
    if isinstance(image, np.ndarray) or type(image).__module__.startswith("torch"):
        if getattr(image, "ndim", 0) == 4:
            return [image[i] for i in range(image.shape[0])]
    return [image]


def _to_pil(image: ImageLike, value_range: tuple[float, float] | None = None):
    """An in-memory image as an 8-bit RGB PIL image (what the extractor decodes files into).

    Float values in `value_range` ((0, 1) when not given) map linearly onto 0..255 and are
    rounded to 8 bits, as a file would hold them; a value outside it, NaN or inf is refused.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise DitfError(f"an image must have pixels, got a {image.width}x{image.height} PIL image")
        return image.convert("RGB")
    array = image
    if type(image).__module__.startswith("torch"):
        array = _as_numpy(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if not isinstance(array, np.ndarray):
        raise DitfError(f"an image must be a path, a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DitfError(f"an image array must be (H, W, 3) or (H, W) (a tensor also (3, H, W), a batch (B, 3, H, W)), "
                        f"got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DitfError(f"an image must have pixels, got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        if value_range is not None and value_range != (0.0, 255.0):
            raise DitfError(f"a uint8 image holds 0..255; value_range={value_range} declares another range "
                            "(pass floats, or leave value_range out)")
    elif np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        low, high = value_range or (0.0, 1.0)
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise DitfError("an image holds NaN or inf values")
        lowest, highest = float(values.min()), float(values.max())
        if lowest < low or highest > high:
            hint = ("; for DIFT-style tensors pass value_range=(-1, 1), for 0..255 floats value_range=(0, 255)"
                    if value_range is None else "")
            raise DitfError(f"image values span [{lowest:g}, {highest:g}], outside value_range ({low:g}, {high:g}): "
                            f"nothing is clipped{hint}")
        array = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
    else:
        raise DitfError(f"an image array must be uint8 or floating point, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def image_key(image: ImageLike, value_range: tuple[float, float] | None = None) -> str:
    """The store key `DiTF.features` gives an image: "img-" and a digest of its decoded pixels.

    Paths are decoded as the extractor decodes them (EXIF orientation applied); look a cached
    image up with `open_store(store).features(..., image=image_key(x))`.
    """
    from .core.images import load_rgb, pixel_digest

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DitfError(f"image {path} does not exist or is not a file")
        pil = load_rgb(path)
    else:
        pil = _to_pil(image, _check_range(value_range))
    return f"img-{pixel_digest(pil)[:20]}"


def _records(images: Sequence[ImageLike], folder: Path, value_range: tuple[float, float] | None,
             keys: Sequence[str] | None, texts: Sequence[str] | None) -> list[ImageRecord]:
    """One record per input, in order: files as they are, in-memory images written as PNG.

    The key is the caller's (`keys`) or the pixels' digest; with per-image prompts (`texts`) it
    ends in the prompt's digest, so each (image, prompt) has its own row.
    """
    from .core.images import load_rgb, pixel_digest
    from .extract.prompts import per_image_key

    records: list[ImageRecord] = []
    seen: dict[str, str] = {}
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise DitfError(f"image {path} does not exist or is not a file")
            digest = pixel_digest(load_rgb(path))
        else:
            pil = _to_pil(image, value_range)
            digest = pixel_digest(pil)
            path = folder / f"{digest}.png"
            if not path.exists():
                pil.save(path)  # PNG is lossless: the extractor decodes exactly these pixels
        key = keys[i] if keys is not None else f"img-{digest[:20]}"
        if texts is not None:
            key = per_image_key(key, texts[i])
        if seen.get(key, digest) != digest:
            raise DitfError(f"two different images are given the key {key!r}: give each its own key")
        seen[key] = digest
        records.append(ImageRecord(key=key, path=path, prompt=None if texts is None else texts[i]))
    return records


def _check_keys(keys: Sequence[str] | None, n: int) -> list[str] | None:
    if keys is None:
        return None
    keys = [keys] if isinstance(keys, str) else list(keys)
    if len(keys) != n:
        raise DitfError(f"keys: {len(keys)} given for {n} image(s); give one per image")
    for key in keys:
        if not isinstance(key, str) or not key or key != key.strip() or "~" in key or key.startswith("/"):
            raise DitfError(f"keys: {key!r} is not a usable image key (a non-empty name without '~' or a leading '/')")
    return keys


def _prompt_plan(prompt: PromptLike, images: Sequence[Any], conditioned: bool) -> tuple[str | None, list[str] | None]:
    """(the extract prompt mode, per-image texts or None) for `prompt`.

    None: the default mode ("template"); "" or "none": the empty prompt; "template" and
    "captions:FILE": the CLI's modes. Any other text, a list of texts or a function of the image
    is a per-image prompt: one store key holds any number of them (`prompts.PER_IMAGE`).
    """
    from .extract.prompts import PER_IMAGE

    if prompt is None:
        return None, None
    if isinstance(prompt, str):
        if prompt.strip() == "" or prompt == "none":
            return "none", None
        if prompt in _PROMPT_MODES or prompt.startswith("captions:"):
            return prompt, None
        texts = [prompt.split(":", 1)[1] if prompt.startswith("text:") else prompt] * len(images)
    elif callable(prompt):
        texts = [prompt(image) for image in images]
    elif isinstance(prompt, Sequence):
        texts = list(prompt)
        if len(texts) != len(images):
            raise DitfError(f"prompt: {len(texts)} texts given for {len(images)} image(s); give one per image")
    else:
        raise DitfError(f"prompt must be a text, a list of texts or a function of the image, got {type(prompt).__name__}")
    bad = [text for text in texts if not isinstance(text, str)]
    if bad:
        raise DitfError(f"prompt: every per-image prompt must be a str, got {type(bad[0]).__name__}")
    if not conditioned:  # the model reads no text: every prompt gives the same numbers
        return "none", None
    return PER_IMAGE, texts


def _integers(name: str, value: int | Sequence[int] | None, low: int, high: int | None = None) -> list[int] | None:
    """`k` / `t` as a list of ints, refusing anything that is not an integer in range (never rounded)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, range, np.ndarray)) else [value]
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise DitfError(f"{name} must be an integer{' timestep' if name == 't' else ' block index'}, got {v!r}")
        if v < low or (high is not None and v > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise DitfError(f"{name} must be in {span}, got {v}")
        out.append(int(v))
    return out


def _dtype_name(dtype: Any) -> str:
    """"auto", "fp32", "bf16" or "fp16" from a name or a torch dtype ("bfloat16", torch.float16, ...)."""
    names = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16",
             "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}
    text = str(dtype).replace("torch.", "") if dtype is not None else "auto"
    if text not in names:
        raise DitfError(f"dtype {dtype!r} is not one ditf runs: use float32, bfloat16, float16 or 'auto'")
    return names[text]


#: the transformer (UNet) class a pipeline folder names -> ditf's model family
_FAMILY_OF_CLASS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                    "PixArtTransformer2DModel": "pixart", "UNet2DConditionModel": "sd-unet"}


def _width(config: dict) -> int | None:
    """The hidden width a denoiser config states (heads x head size, or a UNet's widest block)."""
    if "num_attention_heads" in config and "attention_head_dim" in config:
        try:
            return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        except (TypeError, ValueError):
            return None
    channels = config.get("block_out_channels")
    return max(channels) if isinstance(channels, list) and channels else None


def _denoiser_config(source: str, hub: dict, revision: str | None) -> dict:
    """`transformer/config.json` (else `unet/config.json`) of a pipeline folder or hub id; no weights read."""
    import json

    from .models.hub import looks_local, offline

    if looks_local(source):
        folder = Path(source)
        if not (folder / "model_index.json").is_file():
            raise DitfError(f"{source}: not a diffusers pipeline folder (no model_index.json) and not a model name "
                            "(see `ditf models`)")
        for sub in ("transformer", "unet"):
            if (folder / sub / "config.json").is_file():
                return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))
        raise DitfError(f"{source}: the pipeline folder has no transformer/ or unet/ config.json")
    from huggingface_hub import hf_hub_download

    options = {**hub, "local_files_only": bool(hub.get("local_files_only")) or offline()}
    failure: Exception | None = None
    for sub in ("transformer", "unet"):
        try:
            path = hf_hub_download(source, f"{sub}/config.json", revision=revision, **options)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception as exc:  # not found, offline, no access: the first line is reported below
            failure = failure or exc
    first = str(failure).strip().splitlines()[0] if failure and str(failure).strip() else type(failure).__name__
    hint = " (offline: HF_HUB_OFFLINE or local_files_only is set)" if options["local_files_only"] else ""
    raise DitfError(f"{source} is neither a model name (see `ditf models`) nor a readable diffusers pipeline{hint}: "
                    f"{first} (a registered model with other weights: from_pretrained(NAME, weights=FOLDER_OR_HUB_ID))")


def resolve_model(source: str, hub: dict | None = None, revision: str | None = None) -> tuple[str, str | None]:
    """(registered model name, weights) for a model name, a hub id or a pipeline folder.

    A registered name is itself; a hub id some registered model loads by default is that model
    ("black-forest-labs/FLUX.1-dev" is "flux"). Any other hub id or folder is recognised by the
    class of its transformer (UNet) config: the family's registered model of the same width
    (a folder saved from "tiny-flux" runs as tiny-flux), else the family's full-size one, with
    the folder or hub id as its weights.
    """
    from .models import get_spec, model_names

    names = model_names()
    if source in names:
        return source, None
    for name in names:
        if get_spec(name).hub_id == source:
            return name, None
    config = _denoiser_config(source, hub or {}, revision)
    class_name = config.get("_class_name")
    family = _FAMILY_OF_CLASS.get(class_name)
    if family is None:
        raise DitfError(f"{source}: its denoiser is a {class_name}, not a family ditf runs "
                        f"({', '.join(sorted(set(_FAMILY_OF_CLASS.values())))})")
    specs = [get_spec(name) for name in names if get_spec(name).family == family]
    same_width = [spec for spec in specs if spec.hidden_size == _width(config)]
    full_size = [spec for spec in specs if not spec.tiny]
    spec = (same_width or full_size or specs)[0]
    return spec.name, source


class DiTF:
    """A DiT feature extractor (DiTF): one model, its weights loaded on first use and kept.

    Build it with `DiTF.from_pretrained`; `features` returns the paper's features of your
    images, `match` the DIFT nearest-neighbour correspondences between two images. The object
    keeps its encoded prompts in memory (bounded, `prompt_memory`), so a loop of `features`
    calls with the same prompt loads the text encoders once.
    """

    def __init__(self, adapter: DiTAdapter) -> None:
        from .extract.prompt_memory import PromptMemory

        self.adapter = adapter
        #: encoded prompts of this model, across calls (the extractor reads it from the adapter)
        self.prompt_memory = PromptMemory()
        adapter.prompt_memory = self.prompt_memory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str = "flux", *, weights: str | None = None,
                        revision: str | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device: str = "auto", cache_dir: str | Path | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> DiTF:
        """A model by registered name ("flux", "sd3.5", "tiny-flux", ...: `ditf models`), hub id or
        local diffusers pipeline folder, as diffusers' own `from_pretrained` takes them.

        A hub id or folder is recognised by its transformer's config class (`resolve_model`).
        `weights` overrides a registered model's weights (a folder or hub id). `dtype` (alias
        `torch_dtype`): "auto" (default: bf16 on a GPU, fp32 on the CPU, as `ditf extract`), a
        name ("bf16", "bfloat16", ...) or a torch dtype. `revision`, `cache_dir`, `token`,
        `local_files_only` go to the hub as in diffusers; weights load on first use.
        """
        from .devices import default_dtype
        from .models import load_adapter

        if dtype is not None and torch_dtype is not None and _dtype_name(dtype) != _dtype_name(torch_dtype):
            raise DitfError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: give one")
        dtype_name = _dtype_name(dtype if dtype is not None else torch_dtype)
        hub = {name: value for name, value in (("cache_dir", str(cache_dir) if cache_dir is not None else None),
                                               ("token", token), ("local_files_only", local_files_only or None))
               if value is not None}
        name, found = resolve_model(str(pretrained_model_name_or_path), hub, revision)
        if weights is not None and found is not None:
            raise DitfError(f"weights={weights!r} given with {pretrained_model_name_or_path!r}, which already names "
                            "weights: give a model name with weights=, or the folder / hub id alone")
        if dtype_name == "auto":
            dtype_name = default_dtype(device)
        adapter = load_adapter(name, weights=weights or found, revision=revision, dtype=dtype_name, device=device)
        adapter.hub_options = hub
        return cls(adapter)

    @property
    def name(self) -> str:
        return self.adapter.spec.name

    def __repr__(self) -> str:
        return f"DiTF({self.name!r}, dtype={self.adapter.dtype}, device={self.adapter.device})"

    def features(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompt: PromptLike = None,
        k: int | Sequence[int] | None = None,
        t: int | Sequence[int] | None = None,
        variant: str | None = None,
        ensemble_size: int | None = None,
        channels: str | Sequence[int] = "auto",
        store: str | Path | None = None,
        img_size: int | None = None,
        resize: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        batch_images: int | None = None,
        compile: str = "auto",
        value_range: tuple[float, float] | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[torch.Tensor] | dict[tuple[int, int], list[torch.Tensor]]:
        """The feature map of each image, a (C, h, w) float32 tensor on the model's token grid.

        `images`: one image or a list; a (B, 3, H, W) batch counts as B images. `value_range`:
        the range of float pixel values, (0, 1) when not given; DIFT's tensors are (-1, 1), 0..255
        floats (0, 255). Values outside it, NaN or inf are refused, never clipped. `prompt`:
        None (the "template" prompt, as `ditf extract`), "" or "none" (the empty prompt), a
        CLI prompt mode ("template", "captions:FILE"), any other text (every image), a list
        of texts (one per image) or a function of the image returning its text; texts are
        per-image prompts, any number of them cached in one store. `keys`: the store keys of
        the images (default: a digest of each image's decoded pixels, `image_key`). `k`, `t`:
        block and timestep (default: the model's paper values); several give a dict keyed by
        (k, t). `variant`: "adaln+cd" (default; "raw" for models without AdaLN), "raw",
        "adaln", "adaln+cd-post", "adaln-t", "adaln-c". `channels`: channels the "+cd"
        variants discard, "auto" (the 100x-median rule over these images), "none" or a list.
        `store`: a Zarr store to cache into and reuse (images already there are not run
        again); default none: the features are computed in memory and nothing is written (the
        same numbers: z is rounded to float16 either way, as the store keeps it).
        `batch_images`, `compile`: as `ditf extract` (speed only).
        """
        value_range = _check_range(value_range)
        single = not isinstance(images, (list, tuple))
        inputs = [part for image in ([images] if single else list(images)) for part in _batch(image)]
        if single and len(inputs) > 1:
            single = False
        if not inputs:
            raise DitfError("no images given")
        keys = _check_keys(keys, len(inputs))
        k_list = _integers("k", k, 0)
        t_list = _integers("t", t, 0, 999)
        mode, texts = _prompt_plan(prompt, inputs, self.adapter.conditioned)
        if variant is None:
            variant = "adaln+cd" if self.adapter.has_adaln else "raw"
        extract_options = dict(k=k_list, t=t_list, img_size=img_size, ensemble_size=ensemble_size,
                               batch_size=batch_size, seed=seed, prompt=mode, progress=progress, resize=resize,
                               adapter=self.adapter, batch_images=batch_images, compile=compile)
        # in-memory images go to the extractor as lossless PNG files here, decoded as files are
        with tempfile.TemporaryDirectory(prefix="ditf-api-") as folder:
            records = _records(inputs, Path(folder), value_range, keys, texts)
            images = _ImageList(list({r.key: r for r in records}.values()))
            record_keys = [r.key for r in records]
            if store is None:
                out = _in_memory_features(images, record_keys, variant, channels, extract_options)
            else:
                out = _stored_features(images, record_keys, variant, channels, extract_options, store, self.name)
        if len(out) == 1:
            return next(iter(out.values()))
        return out

    def match(
        self,
        source: ImageLike,
        target: ImageLike,
        points: Sequence[tuple[float, float]] | np.ndarray,
        **options: Any,
    ) -> np.ndarray:
        """Where (x, y) `points` of `source` land in `target`: (N, 2) float64 pixels, the DIFT rule.

        Both feature maps are upsampled to their image's size and each point goes to the
        target pixel of highest cosine similarity (the `dift` protocol of `ditf match`).
        `options` go to `features` (one k and one t).
        """
        from .match.matchers import make_matcher

        maps = self.features([source, target], **options)
        if isinstance(maps, dict) or len(maps) != 2:
            raise DitfError("match takes one source and one target image, one k and one t")
        value_range = _check_range(options.get("value_range"))
        sizes = [_image_size(image, value_range) for image in (source, target)]
        src, trg = (m.permute(1, 2, 0) for m in maps)
        kps = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return make_matcher("dift").match(src, sizes[0], trg, sizes[1], kps)


def _in_memory_features(images: _ImageList, record_keys: list[str], variant: str, channels: str | Sequence[int],
                        extract_options: dict) -> dict[tuple[int, int], list]:
    """{(k, t): (C, h, w) maps} of `record_keys`, extracted into memory (`pipeline.extract_in_memory`) and
    read with the match stage's own `feature_maps`, as `_stored_features` reads them from a store."""
    from .match.export import feature_maps
    from .pipeline import extract_in_memory

    rows, by_key = extract_in_memory(dataset=images, **extract_options)
    return {key: [m.permute(2, 0, 1).contiguous() for m in feature_maps(features, rows, record_keys, variant, channels)]
            for key, features in by_key.items()}


def _stored_features(images: _ImageList, record_keys: list[str], variant: str, channels: str | Sequence[int],
                     extract_options: dict, store: str | Path, model: str) -> dict[tuple[int, int], list]:
    """{(k, t): (C, h, w) maps} of `record_keys`, extracted into `store` (`pipeline.run_extract`, images already
    there are not run again) and read back from it."""
    from .core.keys import FeatureKey
    from .pipeline import run_extract

    # a URL (s3://, memory://, ...) is handed on as given: a Path would fold its "//"
    store_path = str(store) if "://" in str(store) else Path(store)
    report = run_extract(model=model, dataset=images, store=store_path, **extract_options)
    reader = FeatureStoreReader(store_path)
    out: dict[tuple[int, int], list] = {}
    for path in report.keys:
        key = FeatureKey.parse(path)
        maps = reader.feature_maps(API_DATASET, model, key.k, key.t, variant, record_keys, channels)
        out[(key.k, key.t)] = [m.permute(2, 0, 1).contiguous() for m in maps]
    return out


def _image_size(image: ImageLike, value_range: tuple[float, float] | None = None) -> tuple[int, int]:
    """(width, height) of an image as `features` reads it."""
    if isinstance(image, (str, Path)):
        from .core.images import image_size

        return tuple(image_size(Path(image)))
    return _to_pil(image, value_range).size


class FeatureStoreReader:
    """Read access to a feature store: any cached variant of any image, as `ditf match` computes it."""

    def __init__(self, path: str | Path) -> None:
        from .store.feature_store import FeatureStore

        self.store = FeatureStore(path, read_only=True)

    @property
    def path(self) -> Path:
        return self.store.path

    def keys(self, dataset: str | None = None) -> list[tuple[str, str, int, int]]:
        """Every (dataset, model, k, t) with cached features."""
        return self.store.feature_keys(dataset)

    def images(self, dataset: str) -> list[str]:
        """The image keys registered for `dataset`, in row order."""
        rows = self.store.image_rows(dataset)
        return sorted(rows, key=rows.__getitem__)

    def feature_maps(self, dataset: str, model: str, k: int, t: int, variant: str, images: Sequence[str],
                     channels: str | Sequence[int] = "auto") -> list[torch.Tensor]:
        """(h, w, D) float32 maps of several images of one key (channels resolved once)."""
        from .match.export import feature_maps

        arrays = self.store.open_features(dataset, model, k, t)
        return feature_maps(arrays, self.store.image_rows(dataset), images, variant, channels)

    def features(self, dataset: str, model: str, k: int | None = None, t: int | None = None,
                 variant: str = "adaln+cd", image: str = "", channels: str | Sequence[int] = "auto") -> torch.Tensor:
        """One image's (C, h, w) float32 feature map; k and t default to the model's key when stored, else the only one."""
        from .selection import select_key

        k, t = select_key(self.store, dataset, model, k, t)
        return self.feature_maps(dataset, model, k, t, variant, [image], channels)[0].permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"FeatureStoreReader({str(self.path)!r})"


def open_store(path: str | Path) -> FeatureStoreReader:
    """Open a feature store (written by `ditf extract` or `DiTF.features(store=...)`) read-only.

    `path`: a folder, an object-store URL (s3://, gs://, az://) or a published store
    (https://host/ditf.zarr, hf://datasets/<org>/<name>/ditf.zarr[@revision]; docs/sharing.md).
    """
    return FeatureStoreReader(path)
