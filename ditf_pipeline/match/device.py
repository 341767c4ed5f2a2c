"""Where matching runs: the match device (`--device`) and the nearest-neighbour backend (torch
or FAISS, on the CPU or a GPU).

Why apart from the matchers: both protocols, HPatches (`homography`) and the stage drivers pick
a device and a search backend the same way; FAISS is optional and imported only here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..core.errors import DitfError

#: CPU backend for plain cosine NN; benchmarks/bench_match.py measured torch faster for the
#: 60x60 geoaware grid (FAISS' numpy round trip costs more than the search itself).
CPU_NN_BACKEND = "torch"

#: On a GPU, ``auto`` hands a search to FAISS-GPU from this many query x database scores on
#: (2^24: a 64 MB float32 score matrix; below it one matmul + argmax on the device is a
#: single kernel pair and cannot lose much). A starting value, NOT measured on a GPU:
#: `benchmarks/bench_match.py --device cuda` times both sides to tune it.
FAISS_GPU_MIN_SCORES = 2**24


def nearest_neighbours(queries: torch.Tensor, database: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index (N,) of the largest inner product of each query row against the database rows.

    Both backends are exact, and the result stays on the queries' device. ``auto``: on a CUDA
    device, FAISS-GPU (reading the torch tensors in place, no host copy) when faiss sees a GPU
    and the search has at least `FAISS_GPU_MIN_SCORES` scores, else a matmul on the device;
    on the CPU `CPU_NN_BACKEND`. ``faiss`` on CPU tensors: `faiss.knn` through numpy.
    Ties: torch returns the first maximum; FAISS does not promise an order among equal scores.
    """
    if backend == "auto":
        large = len(queries) * len(database) >= FAISS_GPU_MIN_SCORES
        backend = "faiss" if queries.is_cuda and large and faiss_gpus() > 0 else ("torch" if queries.is_cuda else CPU_NN_BACKEND)
    if backend == "torch":
        return (queries @ database.T).argmax(dim=1)
    if backend != "faiss":
        raise DitfError(f"unknown nearest-neighbour backend {backend!r}; choose auto, torch or faiss")
    if queries.is_cuda and faiss_gpus() > 0:
        return faiss_gpu_search(queries, database)[:, 0]
    import faiss

    xq = np.ascontiguousarray(queries.float().cpu().numpy(), dtype=np.float32)
    xb = np.ascontiguousarray(database.float().cpu().numpy(), dtype=np.float32)
    _, index = faiss.knn(xq, xb, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(index[:, 0].astype(np.int64)).to(queries.device)


@functools.cache
def faiss_gpus() -> int:
    """GPUs faiss can use (0 without faiss or with faiss-cpu); asked once per process."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@functools.cache
def gpu_resources():
    """The process's one `faiss.StandardGpuResources` (temporary memory, streams, cuBLAS handle):
    building one per search allocates and frees GPU memory every call."""
    import faiss

    return faiss.StandardGpuResources()


def faiss_gpu_search(queries: torch.Tensor, database: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N, k) int64 indices of the k largest inner products, FAISS brute force on CUDA tensors.

    `faiss.contrib.torch_utils` lets `faiss.knn_gpu` read the tensors where they are and write
    its results into torch tensors on the same device, on PyTorch's current stream.
    """
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (patches faiss.knn_gpu to take torch tensors)

    device = queries.device.index if queries.device.index is not None else torch.cuda.current_device()
    _, index = faiss.knn_gpu(gpu_resources(), queries.float().contiguous(), database.float().contiguous(), k,
                             metric=faiss.METRIC_INNER_PRODUCT, device=device)
    return index


def mutual_nearest_neighbours(desc_a: torch.Tensor, desc_b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(M, 2) index pairs (i in a, j in b) that are each other's cosine nearest neighbour, on the
    descriptors' device (HPatches' matching rule; `homography.mutual_nearest_neighbours` is the
    numpy twin used on the CPU)."""
    a = desc_a / torch.linalg.vector_norm(desc_a, dim=1, keepdim=True).clamp_min(1e-12)
    b = desc_b / torch.linalg.vector_norm(desc_b, dim=1, keepdim=True).clamp_min(1e-12)
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=a.device)
    nn12 = nearest_neighbours(a, b, backend)
    nn21 = nearest_neighbours(b, a, backend)
    ids = torch.arange(len(a), device=a.device)
    keep = nn21[nn12] == ids
    return torch.stack([ids[keep], nn12[keep]], dim=1)


def resolve_match_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the GPU when torch sees one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    The match stage's own resolver (match imports nothing from the model adapters).
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DitfError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DitfError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DitfError(f"--device {spec}: torch sees no CUDA GPU here; use --device cpu")
    return device

