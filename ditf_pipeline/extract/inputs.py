"""The input pipeline: images decoded ahead of the DiT, digested, ordered and grouped for forwards.

Decoding runs on a thread pool (`decoded`, bounded lookahead) so the DiT never waits for a file;
the pixels land in pinned memory there when they go to a GPU. Every image is digested before
anything is written (`digests`): a name reused for other pixels is refused, never served the
features of the old image. With --batch-images > 1, images of one token grid are put side by
side (`ordered`) and cut into groups that can share a forward (`groups`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..core.errors import DitfError
from ..core.images import image_size, load_for_model, pixel_digest
from ..datasets.base import ImageRecord
from ..models.base import DiTAdapter, LatentPosterior, PromptEmbedding
from .settings import ExtractSettings
from .transfer import pinned

__all__ = ["QueuedImage", "decoded", "digests", "expected_rows", "groups", "ordered"]


@dataclass
class QueuedImage:
    """One image of a group: its row in the sinks, its pixels and prompt on the device, and its
    VAE posterior once encoded (shared by every t)."""

    record: ImageRecord
    row: int
    pixels: torch.Tensor
    prompt: PromptEmbedding
    posterior: LatentPosterior | None = None


def digests(records: Sequence[ImageRecord], pending: set[str], settings: ExtractSettings) -> list[str]:
    """`pixel_digest` of every record, decoding each fully before anything is written.

    Headers alone miss truncated files; a file that fails mid-run would otherwise leave a new
    index row and grown arrays behind. Decoding costs far less than one DiT forward. A file
    that cannot be decoded fails here if it is `pending` (about to be extracted); an already
    complete one that no longer decodes gets no digest (its size is still compared).
    """
    def digest(record: ImageRecord) -> str:
        try:
            return pixel_digest(load_for_model(record.path, settings.resample, exif_transpose=settings.exif_transpose))
        except DitfError:
            if record.key in pending:
                raise
            return ""

    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        return list(pool.map(digest, records))


def decoded(adapter: DiTAdapter, settings: ExtractSettings, records: Sequence[ImageRecord],
            batch_images: int) -> Iterator[tuple[ImageRecord, torch.Tensor]]:
    """Decode and preprocess images ahead of the DiT (bounded lookahead), as (3, H, W) float32
    tensors, already in pinned memory when they go to a GPU (the pinning runs in the pool)."""
    device = adapter.device

    def load(record: ImageRecord) -> torch.Tensor:
        pixels = adapter.prepare_image(
            load_for_model(record.path, settings.resample, exif_transpose=settings.exif_transpose),
            settings.img_size, side=settings.resize, resample=settings.resample,
        )
        return pinned(torch.from_numpy(pixels), device)

    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        lookahead = max(2 * max(1, settings.workers), 2 * batch_images)
        futures = [pool.submit(load, r) for r in records[:lookahead]]
        for i, record in enumerate(records):
            pixels = futures[i].result()
            if i + lookahead < len(records):
                futures.append(pool.submit(load, records[i + lookahead]))
            futures[i] = None
            yield record, pixels


def ordered(adapter: DiTAdapter, settings: ExtractSettings, records: Sequence[ImageRecord],
            batch_images: int) -> list[ImageRecord]:
    """With --batch-images > 1, images of one token grid next to each other (stable order
    otherwise), so they can share forwards; grids come from the headers, nothing is decoded."""
    if batch_images == 1:
        return list(records)

    def grid(record: ImageRecord) -> tuple[int, int]:
        width, height = image_size(record.path, exif_transpose=settings.exif_transpose)
        return adapter.grid_size(width, height, settings.img_size, settings.resize)

    return sorted(records, key=grid)


def groups(decoded: Iterable[tuple[ImageRecord, torch.Tensor]], texts: dict[str, str],
           embeddings: dict[str, PromptEmbedding], batch_images: int) -> Iterator[list[tuple[ImageRecord, torch.Tensor]]]:
    """Consecutive decoded images that can share a forward: same pixel size (so same token
    grid) and prompt embeddings of the same shapes, at most `batch_images` of them."""
    group: list[tuple[ImageRecord, torch.Tensor]] = []
    signature = None
    for record, pixels in decoded:
        prompt = embeddings[texts[record.key]]
        mine = (tuple(pixels.shape), tuple(sorted((name, tuple(value.shape)) for name, value in prompt.items())))
        if group and (mine != signature or len(group) == batch_images):
            yield group
            group = []
        group.append((record, pixels))
        signature = mine
    if group:
        yield group


def expected_rows(rows: dict[str, int], records: Sequence[ImageRecord]) -> dict[str, int]:
    """The rows `register_images` will give `records` (indexed keys keep theirs, new ones follow in order)."""
    expected, start = dict(rows), len(rows)
    for record in records:
        if record.key not in expected:
            expected[record.key] = start
            start += 1
    return expected
