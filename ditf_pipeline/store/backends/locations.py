"""Where a store lives: a `--store` value parsed once into a local folder or an object-store URL."""

from __future__ import annotations

import os
from pathlib import Path

from ...core.errors import DitfError

__all__ = ["OBJECT_SCHEMES", "is_remote", "local_beside", "store_location"]

#: URL schemes served by fsspec object-store backends (installed as extras: s3fs, gcsfs, adlfs)
OBJECT_SCHEMES = {"s3": "s3fs (pip install 'ditf[s3]')", "s3a": "s3fs (pip install 'ditf[s3]')",
                  "gs": "gcsfs (pip install 'ditf[gcs]')", "gcs": "gcsfs (pip install 'ditf[gcs]')",
                  "az": "adlfs (pip install 'ditf[azure]')", "abfs": "adlfs (pip install 'ditf[azure]')",
                  "abfss": "adlfs (pip install 'ditf[azure]')"}


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
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return Path(rest)
    if scheme not in OBJECT_SCHEMES:
        raise DitfError(f"--store {text}: unknown URL scheme {scheme}:// (use a path, file://, s3://, gs:// or az://)")
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
    flat = location.replace("://", "_").replace("/", "_")
    return Path(os.environ.get("DITF_RESULTS_ROOT") or "stores") / f"{flat}{suffix}"
