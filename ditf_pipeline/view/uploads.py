"""The user's own image pairs: decoded, checked, cached as PNG and run through `ditf_pipeline.extract.extractor`.

Uploads never touch the main store (the view opens it read-only): images go to
``<folder>/images/<id>.png`` (id = the first 16 hex digits of the SHA-256 of the uploaded
bytes, so the same picture is one file and one feature row however often it is sent) and
features to the writable store ``<folder>/features.zarr`` under dataset ``folder``, through the
same `Extractor` as `ditf extract`.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
from pathlib import Path

from ..core.errors import DitfError

#: largest upload accepted, in bytes (a phone photo is a few MB)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: dataset name of uploaded images inside the uploads store (the `folder` reader reads them)
UPLOAD_DATASET = "folder"
_ID = re.compile(r"^[0-9a-f]{16}$")


class Uploads:
    """A folder of uploaded images and the writable store of their features."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.store_path = self.folder / "features.zarr"
        self._adapters: dict[str, object] = {}
        self._lock = threading.Lock()  # one extraction at a time (the adapters are not thread safe)

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
        from ..core.images import load_rgb

        if not data:
            raise DitfError("the uploaded image is empty")
        if len(data) > MAX_UPLOAD_BYTES:
            raise DitfError(f"the uploaded image has {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
        image_id = hashlib.sha256(data).hexdigest()[:16]
        path = self.images / f"{image_id}.png"
        if path.is_file():
            return image_id
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DitfError(f"cannot write the uploads folder {self.folder}: {exc.strerror or exc}") from None
        with tempfile.TemporaryDirectory(prefix="ditf-upload-") as folder:
            raw = Path(folder) / "upload"
            raw.write_bytes(data)
            try:
                rgb = load_rgb(raw)
            except DitfError as exc:
                raise DitfError(f"the uploaded file is not a readable image ({str(exc).split(': ', 1)[-1]})") from None
        partial = self.images / f".{image_id}.partial.png"  # hidden: the folder reader skips it
        rgb.save(partial, format="PNG")
        partial.replace(path)  # atomic: a half-written PNG is never seen under its id
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
