"""The user's own image pairs: decoded, checked, cached as PNG and run through `ditf_pipeline.extract.extractor`.

Uploads never touch the main store (the view opens it read-only): images go to
``<folder>/images/<id>.png`` (id = the first 16 hex digits of the SHA-256 of the uploaded
bytes, so the same picture is one file and one feature row however often it is sent) and
features to the writable store ``<folder>/features.zarr`` under dataset ``folder``, through the
same `Extractor` as `ditf extract`.

Everything an upload can cost is bounded: its bytes (`MAX_UPLOAD_BYTES`), its pixels, checked
from the header before anything is decoded (`MAX_UPLOAD_PIXELS`), one decode at a time, the
stored PNG (downscaled to `MAX_STORED_SIDE`: a noise JPEG would otherwise grow twentyfold as a
PNG) and the folder as a whole (`max_bytes`, refused beyond it). Only the models the page
offers run (`models`): a name of the registry that is not offered would start a download.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import DitfError

#: largest upload accepted, in bytes (a phone photo is a few MB)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: most pixels an upload may declare (a 48 MP phone photo fits; decoding costs ~3 bytes a pixel, twice)
MAX_UPLOAD_PIXELS = 50_000_000
#: longest side of the stored PNG (the models see 1024 px at most; clicks are scaled to it)
MAX_STORED_SIDE = 2048
#: default bound of the uploads folder (images and their features), in bytes
MAX_FOLDER_BYTES = 2 * 1024**3
#: dataset name of uploaded images inside the uploads store (the `folder` reader reads them)
UPLOAD_DATASET = "folder"
_ID = re.compile(r"^[0-9a-f]{16}$")


class Uploads:
    """A folder of uploaded images and the writable store of their features."""

    def __init__(self, folder: Path | str, models: Iterable[str] | None = None, max_bytes: int = MAX_FOLDER_BYTES) -> None:
        """`models`: the names an upload may run (None: the built-in tiny ones, see `offered_models`)."""
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.store_path = self.folder / "features.zarr"
        self.models = None if models is None else sorted(set(models))
        self.max_bytes = int(max_bytes)
        self._adapters: dict[str, object] = {}
        self._lock = threading.Lock()  # one extraction at a time (the adapters are not thread safe)
        self._decode_lock = threading.Lock()  # one decode at a time: memory is bounded by one image

    def offered_models(self, stored: Iterable[str] = ()) -> list[str]:
        """The models the page lists and an upload may run: the tiny ones and the store's, if registered."""
        if self.models is not None:
            return list(self.models)
        from ..models import model_names

        names = set(model_names())
        return sorted({m for m in names if m.startswith("tiny-")} | (set(stored) & names))

    def used_bytes(self) -> int:
        """Bytes the uploads folder holds now (images and features)."""
        total = 0
        for folder, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:  # removed meanwhile
                    pass
        return total

    def _check_room(self, incoming: int) -> None:
        used = self.used_bytes()
        if used + incoming > self.max_bytes:
            raise DitfError(f"the uploads folder is full ({used // 2**20} MiB of {self.max_bytes // 2**20} MiB): "
                            "delete old uploads or restart `ditf view` with a larger --uploads-max-mb")

    def image_path(self, image_id: str) -> Path:
        """The cached PNG of an upload id; ids are checked, so no other file can be named."""
        if not isinstance(image_id, str) or not _ID.match(image_id):
            raise DitfError(f"upload id must be 16 hex digits, got {image_id!r}")
        path = self.images / f"{image_id}.png"
        if not path.is_file():
            raise DitfError(f"no uploaded image {image_id}")
        return path

    def add_image(self, data: bytes) -> str:
        """Decode (EXIF orientation applied, bombs and corrupt files refused), store as PNG; its id."""
        from PIL import Image

        from ..core.images import load_rgb

        if not data:
            raise DitfError("the uploaded image is empty")
        if len(data) > MAX_UPLOAD_BYTES:
            raise DitfError(f"the uploaded image has {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
        image_id = hashlib.sha256(data).hexdigest()[:16]
        path = self.images / f"{image_id}.png"
        if path.is_file():
            return image_id
        self._check_room(len(data))
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DitfError(f"cannot write the uploads folder: {exc.strerror or exc}") from None
        with self._decode_lock, tempfile.TemporaryDirectory(prefix="ditf-upload-") as folder:
            raw = Path(folder) / "upload"
            raw.write_bytes(data)
            try:
                width, height = _declared_size(raw)  # the header only: refuse before decoding
                if width * height > MAX_UPLOAD_PIXELS:
                    raise DitfError(f"upload: {width}x{height} = {width * height} pixels; the limit is {MAX_UPLOAD_PIXELS}")
                rgb = load_rgb(raw)
            except DitfError as exc:
                raise DitfError(f"the uploaded file is not a readable image ({str(exc).split(': ', 1)[-1]})") from None
            if max(rgb.size) > MAX_STORED_SIDE:
                scale = MAX_STORED_SIDE / max(rgb.size)
                rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS)
            # a name of its own per request (hidden: the folder reader skips it): two uploads of the
            # same picture at once each write their own file, and the last rename wins atomically
            handle, partial = tempfile.mkstemp(prefix=f".{image_id}.", suffix=".partial.png", dir=self.images)
            try:
                with os.fdopen(handle, "wb") as out:
                    rgb.save(out, format="PNG")
                os.replace(partial, path)
            except OSError as exc:
                Path(partial).unlink(missing_ok=True)
                raise DitfError(f"cannot write the uploads folder: {exc.strerror or exc}") from None
        return image_id

    def _adapter(self, model: str):
        from ..models import load_adapter, resolve_device

        if model not in self._adapters:
            dtype = "bf16" if resolve_device("auto").type == "cuda" else "fp32"
            self._adapters[model] = load_adapter(model, dtype=dtype, device="auto")
        return self._adapters[model]

    def extract(self, model: str, k: int | None, t: int | None, image_ids: list[str]) -> tuple[str, str, int, int]:
        """Features of the uploaded images at (model, k, t) (the model's defaults when None); the store key."""
        from ..datasets import get_dataset
        from ..extract.extractor import Extractor, default_settings
        from ..models import get_spec
        from ..store.feature_store import FeatureStore

        spec = get_spec(model)
        paths = {image_id: self.image_path(image_id) for image_id in image_ids}
        with self._lock:
            data = get_dataset(UPLOAD_DATASET, self.images)
            records = [record for record in data.images() if record.key in paths]
            settings = default_settings(spec, data, ks=[k] if k is not None else None, ts=[t] if t is not None else None)
            try:
                adapter = self._adapter(model)
                Extractor(adapter, FeatureStore(self.store_path), settings).run(data, progress=False, records=records)
            except DitfError:
                raise
            except (OSError, ValueError, RuntimeError) as exc:  # weights missing offline, out of memory, ...
                raise DitfError(f"cannot run model {model!r} here: {type(exc).__name__}: {exc}") from exc
        return UPLOAD_DATASET, model, settings.ks[0], settings.ts[0]


def _declared_size(path: Path) -> tuple[int, int]:
    """(width, height) an image file declares in its header, read without decoding any pixel.

    Not `images.image_size`: it reads the EXIF block, which for a PNG can mean decoding the
    whole image first.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller applies its own, lower limit
            with Image.open(path) as img:
                return img.size
    except Image.DecompressionBombError as exc:
        raise DitfError(f"upload: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DitfError(f"upload: {exc}") from None
