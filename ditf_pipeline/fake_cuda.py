"""Run a CUDA code path on the CPU so that it fails where a GPU would: a stand-in "cuda:0".

Why: the GPU branches of the pipeline (a feature cache on the device, batched matching,
fusion, paper precision, propagation, HPatches MNN) are taken only when a tensor's device is
CUDA, and the machines that run the tests have none. Crashes that only CUDA shows -- `.numpy()`
or `np.asarray` on a device tensor, an operation mixing a device tensor with a host tensor --
went unseen until a GPU ran them. Inside `fake_cuda()`:

* ``torch.cuda.is_available()`` is True (one device), so ``auto`` resolves to ``cuda``;
* every tensor made on or moved to ``cuda`` is a `FakeCudaTensor`: its data lives on the
  CPU, but it reports ``device == cuda:0`` and ``is_cuda``, so the code takes its GPU branch;
* CUDA's rules are enforced: `.numpy()` / ``np.asarray`` / ``__array__`` raise as on a GPU;
  an operation mixing a device tensor with a host tensor of one element or more raises
  (0-dim host tensors are allowed, as CUDA allows CPU scalars; index tensors of ``t[idx]``
  may live on the host, as CUDA allows; ``copy_`` and assignment copy across);
* ``.cpu()`` / ``.to("cpu")`` return a host copy, ``.to("cuda")`` a device copy;
* `FakeCuda.uploads` and `FakeCuda.downloads` count host->device and device->host copies
  (tests of the GPU pair loop count host waits with them); ``downloads_by`` names the caller.

The arithmetic is the CPU's, so results can be compared bit for bit with the CPU path. It is
a test and dry-run tool: nothing in the pipeline imports it.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_NUMPY_ERROR = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."

#: functions that may mix a device tensor with host tensors (as CUDA allows)
_MIXING_ALLOWED = {
    torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.__setitem__,
    torch.Tensor.new_tensor, torch.Tensor.type_as,
}


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:0 (see the module docstring)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def numpy(self, *args, **kwargs):  # type: ignore[override]
        raise TypeError(_NUMPY_ERROR)

    def __array__(self, *args, **kwargs):
        raise TypeError(_NUMPY_ERROR)

    def get_device(self) -> int:  # type: ignore[override]
        return 0


def _is_fake(value) -> bool:
    return isinstance(value, FakeCudaTensor)


def _is_host(value) -> bool:
    return isinstance(value, torch.Tensor) and not _is_fake(value) and value.device.type == "cpu"


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.as_subclass(torch.Tensor) if _is_fake(tensor) else tensor


def _to_fake(value):
    if isinstance(value, torch.Tensor) and not _is_fake(value):
        return value.as_subclass(FakeCudaTensor)
    return value


def _is_cuda_spec(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        with contextlib.suppress(RuntimeError, ValueError):
            return torch.device(value).type == "cuda"
    return False


def _is_cpu_spec(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cpu"
    if isinstance(value, str):
        with contextlib.suppress(RuntimeError, ValueError):
            return torch.device(value).type == "cpu"
    return False


def _caller() -> str:
    """file:function of the first frame outside this module and torch (who asked for a copy)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name == __file__ or "/torch/" in name):
            return f"{name.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class FakeCuda(TorchFunctionMode):
    """The torch-function mode behind `fake_cuda()`."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads = 0
        self.downloads = 0
        self.downloads_by: Counter[str] = Counter()
        self.uploads_by: Counter[str] = Counter()

    def _check_mixing(self, func, args, kwargs) -> None:
        if func in _MIXING_ALLOWED:
            return
        if func is torch.Tensor.__getitem__:  # CUDA tensors take host index tensors, not the reverse
            if _is_host(args[0]) and args[0].ndim > 0 and any(_is_fake(v) for v in tree_flatten(args[1:])[0]):
                raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
            return
        leaves = tree_flatten((args, kwargs))[0]
        if any(_is_fake(v) for v in leaves) and any(_is_host(v) and v.ndim > 0 for v in leaves):
            name = getattr(func, "__name__", str(func))
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! ({name})"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.pin_memory:
            return _plain(args[0]).clone()
        if func is torch.Tensor.is_pinned:
            return False
        to_device = "device" in kwargs and _is_cuda_spec(kwargs["device"])
        if to_device:
            kwargs["device"] = "cpu"
        self._check_mixing(func, args, kwargs)
        out = func(*args, **kwargs)
        if to_device:
            if func in (torch.as_tensor, torch.tensor) and args and not isinstance(args[0], torch.Tensor):
                self._upload()
            elif func in (torch.as_tensor, torch.tensor) and args and _is_host(args[0]):
                self._upload()
            out = tree_map(_to_fake, out)
        return out

    def _upload(self) -> None:
        self.uploads += 1
        self.uploads_by[_caller()] += 1

    def _download(self) -> None:
        self.downloads += 1
        self.downloads_by[_caller()] += 1

    def _move(self, func, args, kwargs):
        tensor, rest = args[0], list(args[1:])
        if func is torch.Tensor.cpu:
            target = "cpu"
        elif func is torch.Tensor.cuda:
            target = "cuda"
        else:
            spec = kwargs.get("device")
            for value in rest:
                if isinstance(value, (str, torch.device)):
                    spec = value
                elif isinstance(value, torch.Tensor):
                    spec = value.device
            target = "cuda" if _is_cuda_spec(spec) else "cpu" if _is_cpu_spec(spec) else None
        if target is None:  # a dtype change only: stays where it is
            return func(*args, **kwargs)
        if func is torch.Tensor.to:
            rest = [v for v in rest if not isinstance(v, (str, torch.device, torch.Tensor))]
            kwargs.pop("device", None)
            kwargs.pop("non_blocking", None)
            kwargs.pop("copy", None)
            dtype = next((v for v in rest if isinstance(v, torch.dtype)), kwargs.pop("dtype", None))
        else:
            dtype = None
        source = _plain(tensor)
        if target == "cuda":
            if _is_fake(tensor):
                return tensor.to(dtype) if dtype is not None else tensor
            self._upload()
            return source.to(dtype=dtype, copy=True).as_subclass(FakeCudaTensor)
        if _is_fake(tensor):
            self._download()
            return source.to(dtype=dtype, copy=True)
        return source.to(dtype) if dtype is not None else source


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Within the block, ``cuda`` is a CPU-backed stand-in device (see the module docstring)."""
    mode = FakeCuda()
    patches = [
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(torch.cuda, "get_device_name", lambda *a, **k: "fake-cuda (CPU)"),
        mock.patch.object(torch.cuda, "empty_cache", lambda: None),
        mock.patch.object(torch.cuda, "mem_get_info", lambda *a, **k: (60 * 2**30, 80 * 2**30)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(mode)
        yield mode
