"""The image index of a dataset: its rows (key, size, pixel digest), checks and registration.

Rows are appended past the committed `count` and committed by raising it, so a kill between
leaves rows the next registration overwrites. Locally the index's lock keeps writers apart; on
S3 the registration is also a compare-and-swap (`register_conditionally`). `FeatureStore` is
the face; this module holds what the index is, apart from where the store keeps it.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import zarr
from zarr.abc.store import Store

from ..core.errors import DitfError
from . import legacy
from .failures import reason
from .schema import create_digest_array, writable

#: how often a conditional registration of images starts over after another writer changed the
#: index under it (each try re-reads it; only writers that lost their lease collide at all)
INDEX_TRIES = 5
#: the group attribute a conditional registration claims the index with (`register_conditionally`)
CLAIM = "registration"


def claim() -> dict[str, object]:
    """A registration's claim of the image index: unique, and naming who made it when, so that a
    mark left behind by a killed writer can be told apart and reported (`ditf doctor`)."""
    return {"id": uuid.uuid4().hex, "host": os.uname().nodename, "pid": os.getpid(), "at": time.time()}


#: one image to add to the index: (key, (width, height), pixel digest)
NewRow = tuple[str, tuple[int, int], str]


def committed_rows(index: zarr.Group) -> dict[str, int]:
    """image key -> row of every committed row of the image index `index`."""
    if "key" not in index:
        return {}
    count = legacy.committed_rows(index)
    keys = index["key"][:count] if count else []
    return {str(key): row for row, key in enumerate(keys)}


def identities(index: zarr.Group) -> dict[str, tuple[tuple[int, int], str]]:
    """image key -> ((width, height), pixel digest) of every committed row of `index`."""
    if "key" not in index:
        return {}
    count = legacy.committed_rows(index)
    if not count:
        return {}
    keys, sizes = index["key"][:count], index["size"][:count]
    digests = index["digest"][:count] if "digest" in index and index["digest"].shape[0] >= count else [""] * count
    return {str(key): ((int(size[0]), int(size[1])), str(digest)) for key, size, digest in zip(keys, sizes, digests)}


def check_identities(index: zarr.Group, store: object, dataset: str, keys: Sequence[str],
                      sizes: Sequence[tuple[int, int]], digests: Sequence[str] | None) -> None:
    """Refuse an indexed key given now with other pixels (`FeatureStore.check_identities`), in `index` of `store`."""
    stored = identities(index)
    digests = list(digests) if digests is not None else [""] * len(keys)
    for key, size, digest in zip(keys, sizes, digests):
        if key not in stored:
            continue
        (width, height), known = stored[key]
        if (width, height) != tuple(size) or (known and digest and known != digest):
            what = (f"stored {width}x{height}, now {size[0]}x{size[1]}" if (width, height) != tuple(size)
                    else f"both {width}x{height}, other pixels")
            raise DitfError(
                f"image {key!r} of {dataset} in {store} was extracted from another image ({what}): its "
                f"stored features are not this image's; give the new image another name or use another --store"
            )


def new_rows(rows: Mapping[str, int], keys: Sequence[str], sizes: Sequence[tuple[int, int]],
              digests: Sequence[str] | None) -> list[NewRow]:
    """(key, size, digest) of the images not in `rows` yet, in the order given."""
    digests = list(digests) if digests is not None else [""] * len(keys)
    return [(key, size, digest) for key, size, digest in zip(keys, sizes, digests) if key not in rows]


def append_rows(index: zarr.Group, start: int, new: Sequence[NewRow]) -> None:
    """Write `new` as rows `start`... of the image index `index` (not committed: `count` is the caller's)."""
    if "digest" not in index:  # an index of an earlier version: the column is added
        create_digest_array(index, int(index["key"].shape[0]))
    key_array, size_array, digest_array = writable(index["key"]), writable(index["size"]), writable(index["digest"])
    for array, shape in ((key_array, (start + len(new),)), (size_array, (start + len(new), 2)),
                         (digest_array, (start + len(new),))):
        array.resize(shape)
    key_array[start:] = np.array([key for key, _, _ in new], dtype=object).astype(str)
    size_array[start:] = np.array([size for _, size, _ in new], dtype="int32").reshape(-1, 2)
    digest_array[start:] = np.array([digest for _, _, digest in new], dtype=object).astype(str)


def register_conditionally(where: str, dataset: str, keys: Sequence[str], sizes: Sequence[tuple[int, int]],
                           digests: Sequence[str] | None, conditional_store: Callable[[], Store]) -> dict[str, int]:
    """`FeatureStore.register_images` on S3 as a compare-and-swap over the index's objects.

    The lease keeps live writers apart, but a writer stalled past its lease (or two that
    took over one stale lease at once) could still write the index from what it read before
    the other's registration, and un-index the other's images. So every write of the
    registration is conditional (`backends.conditional`): each `conditional_store()` knows the ETag of each
    index object as listed before anything was read, and the server refuses a write to an
    object changed since. The registration first claims the index by rewriting the group's
    zarr.json with a unique `registration` mark (If-Match the listed version), then writes
    its rows past `count` (each chunk and array metadata If-Match what it saw), and commits
    by rewriting zarr.json with the new `count` and without the mark (If-Match its claim).
    Of two registrations that overlap, the later claim makes the earlier's commit fail, and
    a chunk written by the one after the other listed it fails the other's write: a commit
    that succeeds commits rows nobody overwrote. A refused write (`Conflict`) starts over
    from a fresh listing and reading (the rows another writer committed meanwhile are
    merged: its keys keep its rows, ours follow), at most `INDEX_TRIES` times.
    """
    from .backends.conditional import Conflict  # imported with the object backend it serves, as `backend_for` does

    for attempt in range(INDEX_TRIES):
        if attempt:  # a fresh listing of the versions, after a pause that spreads the retries
            time.sleep(random.uniform(0.05, 0.2) * attempt)
        store = conditional_store()
        try:
            group = zarr.open_group(store=store, mode="r+", use_consolidated=False)
            check_identities(group, where, dataset, keys, sizes, digests)
            rows = committed_rows(group)
            new = new_rows(rows, keys, sizes, digests)
            attrs = {name: value for name, value in group.attrs.asdict().items() if name != CLAIM}
            if not new:
                if CLAIM in group.attrs:
                    # a mark left by a registration that never committed (its writer was killed,
                    # or stalled past its lease): we hold the index's lease, so its claimant holds
                    # none; clearing it (If-Match the listed version) only makes a stalled
                    # claimant's commit fail, which then starts over
                    group.attrs.put(attrs)
                return rows
            start = len(rows)
            group.attrs.put({**attrs, CLAIM: claim()})  # the claim: later commits of others fail
            append_rows(group, start, new)
            group.attrs.put({**attrs, "count": start + len(new)})  # the commit, If-Match our claim
        except Conflict:
            continue
        except (DitfError, OSError):
            raise
        except Exception as exc:  # zarr raises several types for a damaged node (as `reads` says)
            raise DitfError(f"store {where}: the image index is damaged ({reason(exc)}): "
                            "run `ditf doctor --repair`") from exc
        rows.update({key: start + i for i, (key, _, _) in enumerate(new)})
        return rows
    raise DitfError(f"the image index of {dataset} in {where} kept changing under this writer "
                    f"({INDEX_TRIES} tries to register {len(keys)} images): rerun")
