"""Where a store lives: a `--store` value parsed once into a local folder, an object-store URL or a
published (read-only) URL.

Published stores are served by HTTP(S) or the Hugging Face Hub: both read files but cannot list
folders or write, so they are read through the store's consolidated metadata (`ditf pack` writes
it). A local read cache is fsspec's own URL chaining: ``simplecache::https://...`` or
``filecache::hf://...``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...core.errors import DitfError

__all__ = ["CACHE_PREFIXES", "OBJECT_SCHEMES", "READ_ONLY_SCHEMES", "is_read_only", "is_remote", "local_beside",
           "read_only_scheme", "store_location"]

#: URL schemes served by fsspec object-store backends (installed as extras: s3fs, gcsfs, adlfs)
OBJECT_SCHEMES = {"s3": "s3fs (pip install 'ditf[s3]')", "s3a": "s3fs (pip install 'ditf[s3]')",
                  "gs": "gcsfs (pip install 'ditf[gcs]')", "gcs": "gcsfs (pip install 'ditf[gcs]')",
                  "az": "adlfs (pip install 'ditf[azure]')", "abfs": "adlfs (pip install 'ditf[azure]')",
                  "abfss": "adlfs (pip install 'ditf[azure]')"}

#: URL schemes of published stores: read-only, no listing (read through consolidated metadata)
READ_ONLY_SCHEMES = {"http": "HTTP", "https": "HTTPS", "hf": "the Hugging Face Hub"}
#: fsspec's local read caches, chained in front of a published URL (``simplecache::https://...``)
CACHE_PREFIXES = ("simplecache", "filecache", "blockcache")
#: repository types of an hf:// URL (huggingface_hub's HfFileSystem paths)
_HF_REPO_TYPES = ("datasets", "models", "spaces")


def is_read_only(location: str | Path) -> bool:
    """Whether a parsed location is a published store (http(s)://, hf://, possibly behind a cache)."""
    if isinstance(location, Path):
        return False
    return location.rsplit("::", 1)[-1].split("://", 1)[0].lower() in READ_ONLY_SCHEMES


def read_only_scheme(location: str) -> str:
    """The scheme a published location is served by, as a user reads it (e.g. ``https://``)."""
    return location.rsplit("::", 1)[-1].split("://", 1)[0].lower() + "://"


def _hf_url(text: str, rest: str) -> str:
    """``hf://datasets/<org>/<name>/<path>[@revision]`` -> HfFileSystem's ``hf://datasets/<org>/<name>@<revision>/<path>``.

    The revision may also be written where HfFileSystem puts it (after the repository name).
    A revision holding "/" (``refs/pr/1``) is URL-encoded as HfFileSystem expects.
    """
    parts = rest.strip("/").split("/")
    if len(parts) < 3 or parts[0] not in _HF_REPO_TYPES:
        raise DitfError(f"--store {text}: write hf://datasets/<org>/<name>/<path to the store>[@revision]")
    kind, org, name, path = parts[0], parts[1], parts[2], "/".join(parts[3:])
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    elif "@" in path:
        path, revision = path.rsplit("@", 1)
    if not org or not name or (revision is not None and not revision):
        raise DitfError(f"--store {text}: write hf://datasets/<org>/<name>/<path to the store>[@revision]")
    repo = f"{org}/{name}" + (f"@{revision.replace('/', '%2F')}" if revision else "")
    return f"hf://{kind}/{repo}" + (f"/{path.rstrip('/')}" if path.strip("/") else "")


def is_remote(store: str | Path) -> bool:
    """Whether `--store` names an object store (s3://, gs://, az://) rather than a local folder."""
    text = str(store)
    return "://" in text and text.split("://", 1)[0].lower() != "file"


def store_location(store: str | Path) -> str | Path:
    """A `--store` value parsed once: a local Path (plain paths and file:// URLs) or an object-store URL.

    Raises
    ------
    DitfError
        For an unknown URL scheme, or a URL without a bucket.
    """
    text = str(store)
    if "://" not in text:
        return Path(text)
    cache, _, url = text.rpartition("::")
    if cache:
        unknown = [p for p in cache.split("::") if p.lower() not in CACHE_PREFIXES]
        if unknown or url.split("://", 1)[0].lower() not in READ_ONLY_SCHEMES:
            raise DitfError(f"--store {text}: a read cache is written simplecache::, filecache:: or blockcache:: "
                            "in front of an http(s):// or hf:// URL")
        return f"{cache}::{store_location(url)}"
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return Path(rest)
    if scheme == "hf":
        return _hf_url(text, rest)
    if scheme in ("http", "https"):
        if not rest.strip("/"):
            raise DitfError(f"--store {text}: name a host and the store's path, e.g. {scheme}://host/ditf.zarr")
        return f"{scheme}://{rest.rstrip('/')}"
    if scheme not in OBJECT_SCHEMES:
        raise DitfError(f"--store {text}: unknown URL scheme {scheme}:// (use a path, file://, s3://, gs://, az://, "
                        "or a published store's https:// or hf://)")
    if not rest.strip("/"):
        raise DitfError(f"--store {text}: name a bucket (and a prefix), e.g. {scheme}://bucket/ditf.zarr")
    return f"{scheme}://{rest.rstrip('/')}"


def local_beside(store: str | Path, suffix: str, *, replace_suffix: bool = True) -> Path:
    """A local folder for files that accompany a store (DAVIS masks, probe heads).

    Beside a local store: `<store>` with its suffix replaced by (or extended with) `suffix`.
    An object store has no local "beside": the folder goes under `DITF_RESULTS_ROOT` (default
    ./stores), named after the URL, e.g. s3://bucket/run/ditf.zarr -> stores/s3_bucket_run_ditf.zarr.results.
    """
    location = store_location(store)
    if isinstance(location, Path):
        if not location.name:  # "." or "/": name it by what it is
            location = location.resolve()
        return location.with_suffix(suffix) if replace_suffix else location.with_name(location.name + suffix)
    flat = location.replace("::", "_").replace("://", "_").replace("/", "_").replace("@", "_")
    return Path(os.environ.get("DITF_RESULTS_ROOT") or "stores") / f"{flat}{suffix}"
