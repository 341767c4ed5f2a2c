"""DiTF from Python: `DiTF.from_pretrained(...).features(images)` and `open_store(path).features(...)`.

This is the command line's own path, not a second one: `DiTF.features` hands the images to
`pipeline.run_extract` (what `ditf extract` calls) as an in-memory image list, into a
temporary store or the one given, and reads each variant back with the match stage's own
`FeatureCache` and `resolve_channels`. The same image with the same settings therefore gives
bit-identical features here and through `ditf extract --dataset folder`.

Images are keyed as the `folder` reader keys them (a file's name without its extension), and
images given as arrays by a hash of their pixels; the per-image noise is seeded by that key.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .datasets.base import Dataset, ImageRecord
from .core.errors import DitfError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .models.base import DiTAdapter

#: What `DiTF.features` accepts per image: a path, a PIL image, an (H, W, 3) array (uint8, or
#: float in [0, 1]) or a torch tensor laid out (3, H, W) or (H, W, 3).
ImageLike = Union[str, Path, "Image.Image", np.ndarray, "torch.Tensor"]

#: The store's dataset name for images given to the API: the same as `ditf extract --dataset
#: folder`, so a store filled by either is reused by the other.
API_DATASET = "folder"

__all__ = ["API_DATASET", "DiTF", "FeatureStoreReader", "ImageLike", "open_store"]


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


def _to_pil(image: ImageLike):
    """An in-memory image as an 8-bit RGB PIL image (what the extractor decodes files into)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image
    if type(image).__module__.startswith("torch"):
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if not isinstance(array, np.ndarray):
        raise DitfError(f"an image must be a path, a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DitfError(f"an image array must be (H, W, 3) or (H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise DitfError(f"an image array must be uint8 or float in [0, 1], got {array.dtype}")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def _records(images: Sequence[ImageLike], folder: Path) -> list[ImageRecord]:
    """One record per input, in order: files as they are, in-memory images written as PNG."""
    records: list[ImageRecord] = []
    seen: dict[str, Path] = {}
    for image in images:
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise DitfError(f"image {path} does not exist or is not a file")
            key = path.stem
        else:
            pil = _to_pil(image)
            digest = hashlib.sha256(np.asarray(pil).tobytes() + repr(pil.size).encode()).hexdigest()[:16]
            key = f"array-{digest}"
            path = folder / f"{key}.png"
            if not path.exists():
                pil.save(path)  # PNG is lossless: the extractor decodes exactly these pixels
        if key in seen and seen[key].resolve() != path.resolve():
            raise DitfError(f"two images share the key {key!r} ({seen[key]} and {path}): rename one")
        seen[key] = path
        records.append(ImageRecord(key=key, path=path))
    return records


def _as_list(value: int | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


class DiTF:
    """A DiT feature extractor (DiTF): one model, its weights loaded on first use and kept.

    Build it with `DiTF.from_pretrained`; `features` returns the paper's features of your
    images, `match` the DIFT nearest-neighbour correspondences between two images.
    """

    def __init__(self, adapter: DiTAdapter) -> None:
        self.adapter = adapter

    @classmethod
    def from_pretrained(cls, name: str = "flux", weights: str | None = None, revision: str | None = None,
                        dtype: str = "auto", device: str = "auto") -> DiTF:
        """The registered model `name` (see `ditf models`: "flux", "sd3.5", "tiny-flux", ...).

        `weights` is a local diffusers pipeline folder or hub id overriding the model's;
        `dtype` "auto" means bf16 on a GPU and fp32 on the CPU, as for `ditf extract`.
        """
        from .devices import default_dtype
        from .models import load_adapter

        if dtype == "auto":
            dtype = default_dtype(device)
        return cls(load_adapter(name, weights=weights, revision=revision, dtype=dtype, device=device))

    @property
    def name(self) -> str:
        return self.adapter.spec.name

    def __repr__(self) -> str:
        return f"DiTF({self.name!r}, dtype={self.adapter.dtype}, device={self.adapter.device})"

    def features(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompt: str | None = None,
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
    ) -> list[torch.Tensor] | dict[tuple[int, int], list[torch.Tensor]]:
        """The feature map of each image, a (C, h, w) float32 tensor on the model's token grid.

        `prompt`: a literal text for every image ("a photo of a cat"), or one of the CLI's
        prompt modes ("template", "none", "captions:FILE"); default "template". `k`, `t`:
        block and timestep (default: the model's paper values); give several to get them all
        from one forward, then the result is a dict keyed by (k, t). `variant`: "adaln+cd"
        (default; "raw" for models without AdaLN), "raw", "adaln", "adaln+cd-post",
        "adaln-t", "adaln-c". `channels`: channels the "+cd" variants discard, "auto" (the
        100x-median rule over these images), "none" or a list. `store`: a Zarr store to cache
        into and reuse (images already there are not run again); default a temporary one.
        `batch_images`, `compile`: as `ditf extract --batch-images / --compile` (speed only).
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise DitfError("no images given")
        if variant is None:
            variant = "adaln+cd" if self.adapter.has_adaln else "raw"
        with contextlib.ExitStack() as stack:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ditf-api-")))
            records = _records(images, folder)
            store_path = Path(store) if store is not None else folder / "features.zarr"
            from .pipeline import run_extract

            report = run_extract(
                self.name, _ImageList(list({r.key: r for r in records}.values())), store=store_path,
                k=_as_list(k), t=_as_list(t), img_size=img_size, ensemble_size=ensemble_size, batch_size=batch_size,
                seed=seed, prompt=prompt, progress=progress, resize=resize, adapter=self.adapter,
                batch_images=batch_images, compile=compile,
            )
            reader = FeatureStoreReader(store_path)
            keys = [r.key for r in records]
            out: dict[tuple[int, int], list] = {}
            for path in report.keys:  # ".../k{K}/t{T}"
                k_name, t_name = path.split("/")[-2:]
                k_, t_ = int(k_name[1:]), int(t_name[1:])
                maps = reader.feature_maps(API_DATASET, self.name, k_, t_, variant, keys, channels)
                out[(k_, t_)] = [m.permute(2, 0, 1).contiguous() for m in maps]
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
        if isinstance(maps, dict):
            raise DitfError("match takes one k and one t")
        sizes = [_image_size(image) for image in (source, target)]
        src, trg = (m.permute(1, 2, 0) for m in maps)
        kps = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return make_matcher("dift").match(src, sizes[0], trg, sizes[1], kps)


def _image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height) of an image as `features` reads it."""
    if isinstance(image, (str, Path)):
        from .core.images import image_size

        return tuple(image_size(Path(image)))
    return _to_pil(image).size


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
        """One image's (C, h, w) float32 feature map; k and t default to the only ones stored."""
        k, t = self.store.find_feature_key(dataset, model, k, t)
        return self.feature_maps(dataset, model, k, t, variant, [image], channels)[0].permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"FeatureStoreReader({str(self.path)!r})"


def open_store(path: str | Path) -> FeatureStoreReader:
    """Open a feature store (written by `ditf extract` or `DiTF.features(store=...)`) read-only.

    `path`: a folder, an object-store URL (s3://, gs://, az://) or a published store
    (https://host/ditf.zarr, hf://datasets/<org>/<name>/ditf.zarr[@revision]; docs/sharing.md).
    """
    return FeatureStoreReader(path)
