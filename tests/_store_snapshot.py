"""A whole store as comparable values: every node's attributes and every array (tests only)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import zarr


def snapshot(path: Path | str) -> dict:
    """Every node's attributes (timestamps dropped) and every array's metadata and values."""
    out = {}

    def walk(group, prefix: str) -> None:
        attrs = dict(group.attrs)
        if "provenance" in attrs:
            attrs["provenance"] = {k: v for k, v in attrs["provenance"].items() if k != "created"}
        out[f"{prefix}/@"] = json.dumps(attrs, sort_keys=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = sorted(group.members(), key=lambda m: m[0])
        for name, node in members:
            if isinstance(node, zarr.Array):
                out[f"{prefix}/{name}"] = (node.shape, str(node.dtype), node.chunks, json.dumps(dict(node.attrs)), node[...])
            else:
                walk(node, f"{prefix}/{name}")

    # a URL (s3://...) is read without fsspec's listing cache: other processes wrote it
    remote = {"storage_options": {"use_listings_cache": False}} if "://" in str(path) else {}
    walk(zarr.open_group(str(path), mode="r", **remote), "")
    return out


def differences(got: dict, want: dict) -> list[str]:
    if got.keys() != want.keys():
        return [f"nodes differ: {sorted(set(got) ^ set(want))}"]
    bad = []
    for key, value in want.items():
        other = got[key]
        if isinstance(value, str):
            if value != other:
                bad.append(key)
        elif value[:4] != other[:4] or not np.array_equal(
                value[4], other[4], equal_nan=value[4].dtype.kind == "f"):
            bad.append(key)
    return bad


def without_store(result: dict) -> dict:
    """A score as two stores holding the same numbers give it: the `store` it names set aside
    (scores record where they came from, so two equal stores at two paths differ only there)."""
    return {key: value for key, value in result.items() if key != "store"}


def files(path: Path | str) -> list[str]:
    """Every file and folder of a local store, relative to it, with what ditf builds beside it
    (`.<name>.ditf-new-*`): what a rerun must leave exactly as an uninterrupted run does.

    Lock files are part of the set (the same locks are taken by both runs); zarr's chunk files
    are too, so a chunk written by one run and not the other shows here as well.
    """
    path = Path(path)
    found = sorted(str(p.relative_to(path)) + ("/" if p.is_dir() else "") for p in path.rglob("*"))
    return found + sorted(f"../{p.name}" for p in path.parent.glob(f".{path.name}.ditf-new-*"))


def file_differences(got: Path | str, want: Path | str) -> list[str]:
    """The files only one of two local stores has ('+' only in `got`, '-' only in `want`)."""
    mine, theirs = set(files(got)), set(files(want))
    return [f"+{name}" for name in sorted(mine - theirs)] + [f"-{name}" for name in sorted(theirs - mine)]
