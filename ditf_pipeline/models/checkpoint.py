"""Reading a diffusers checkpoint: the pipeline folder, the transformer's config and only the weights asked for.

A checkpoint is a diffusers pipeline folder (hub id or local directory, as `save_pretrained`
writes it). `Checkpoint` finds it (a hub id is downloaded once, safetensors only; a folder with
pickled weights only is refused), reads the transformer's `config.json` without any weights,
and builds the transformer cut after the deepest block asked for (`truncated_transformer`):
the module is built with its parameters on the meta device (`parameters_on_meta`), the block
lists are cut, and only the tensors the cut model holds are read from the safetensors files
(`read_tensors`, tensor by tensor). Memory then grows with k (DiTF at Flux k = 28 needs 29 of
57 blocks). What the adapter does with the loaded modules (device, offload, compile) is
`_diffusers.DiffusersAdapter`'s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..core.errors import DitfError
from .hub import looks_local, offline, refuse_pickled

__all__ = ["WEIGHTS", "WEIGHTS_INDEX", "Checkpoint", "NeverRun", "parameters_on_meta", "read_tensors"]

#: diffusers' file names of a model's weights (one file, or shards listed by an index)
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class Checkpoint:
    """The diffusers pipeline folder or hub id `source` (at `revision`) of one model.

    `hub_options` are the Python API's hub download options (`cache_dir`, `token`,
    `local_files_only`); offline when HF_HUB_OFFLINE says so, whatever they say.
    """

    def __init__(self, source: str, revision: str | None, hub_options: Mapping, pipeline_cls: type) -> None:
        self.source = source
        self.revision = revision
        self.hub_options = hub_options
        self.pipeline_cls = pipeline_cls
        self._local: str | None = None

    def hub_kwargs(self) -> dict:
        """Where and how the hub is asked: the options given, offline when HF_HUB_OFFLINE says so."""
        options = {name: value for name, value in self.hub_options.items() if name in ("cache_dir", "token")}
        return {**options, "local_files_only": bool(self.hub_options.get("local_files_only")) or offline()}

    def check(self) -> None:
        """A local source must be a pipeline folder holding safetensors (pickled weights would run code)."""
        path = Path(self.source)
        if looks_local(self.source):
            if not (path / "model_index.json").is_file():
                raise DitfError(f"--weights {self.source}: not a diffusers pipeline folder (no model_index.json)")
            refuse_pickled(path)

    def folder(self) -> str:
        """The weights as a local pipeline folder. A hub id is fetched (or found in the cache) once,
        safetensors only, by diffusers' pipeline downloader at --revision; every component then loads
        from that folder. (Loading a component straight from a hub id goes through diffusers'
        config loader, which passes huggingface_hub's deprecated `local_dir_use_symlinks` and prints
        its warning.)"""
        self.check()
        if self._local is None:
            if looks_local(self.source):
                self._local = self.source
            else:
                self._local = str(self.pipeline_cls.download(
                    self.source, revision=self.revision, use_safetensors=True, **self.hub_kwargs(),
                ))
                refuse_pickled(self._local)
        return self._local

    def transformer_file(self, name: str, required: bool = True) -> Path | None:
        """A file of the transformer subfolder: local, or from the hub (cache) one file at a time."""
        path = Path(self.source)
        if (path / "model_index.json").is_file():
            local = path / "transformer" / name
            if local.is_file() or required:
                return local
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.source, f"transformer/{name}", revision=self.revision, **self.hub_kwargs()))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if required:
                raise
            return None

    def transformer_config(self) -> dict:
        """The transformer's `config.json` as the checkpoint states it (no weights read)."""
        self.check()
        return json.loads(self.transformer_file("config.json").read_text(encoding="utf-8"))

    def weight_files(self, names: Sequence[str]) -> dict[Path, list[str]]:
        """{safetensors file: the wanted tensor names it holds}; only the files needed are fetched."""
        index = self.transformer_file(WEIGHTS_INDEX, required=False)
        if index is not None:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            lacking = [n for n in names if n not in weight_map]
            by_file: dict[str, list[str]] = {}
            for name in names:
                if name in weight_map:
                    by_file.setdefault(weight_map[name], []).append(name)
            files = {self.transformer_file(file): wanted for file, wanted in by_file.items()}
        else:
            single = self.transformer_file(WEIGHTS, required=False)
            if single is None or not single.is_file():
                raise DitfError(f"{self.source}: the transformer has no {WEIGHTS} (ditf reads safetensors weights only)")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
            lacking = [n for n in names if n not in present]
            files = {single: [n for n in names if n in present]}
        if lacking:
            raise DitfError(
                f"the transformer weights of {self.source} lack {len(lacking)} tensor(s) its config.json implies, "
                f"e.g. {lacking[0]}"
            )
        return files

    def truncated_transformer(self, cls: type, config: dict, block_lists: Sequence[tuple[str, str, str]], depth: int,
                              dtype: torch.dtype, keep_list_lengths: bool = False) -> torch.nn.Module:
        """The transformer `cls` of `config` cut after block `depth`, only its tensors read from the checkpoint.

        Built as `from_pretrained` builds it (default dtype = the model dtype, so every tensor
        is rounded the same way), but with the parameters on the meta device until loaded;
        the embedders, modulation and output head stay, the blocks after the cut never exist
        (with `keep_list_lengths`, parameter-free `NeverRun` placeholders keep each list's length).
        """
        with parameters_on_meta(dtype):
            model = cls.from_config(config)
        start = 0
        for attr, entry, _ in block_lists:
            count = int(config[entry])
            keep = min(max(depth + 1 - start, 0), count)
            blocks = list(getattr(model, attr))[:keep]
            if keep_list_lengths:
                blocks += [NeverRun() for _ in range(count - keep)]
            setattr(model, attr, torch.nn.ModuleList(blocks))
            start += count
        wanted = model.state_dict()
        tensors = read_tensors(self.weight_files(list(wanted)), {name: t.dtype for name, t in wanted.items()})
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:  # a tensor whose shape the config does not predict
            detail = " ".join(str(exc).split())[:300]
            raise DitfError(f"the transformer weights of {self.source} do not match its config.json: {detail}") from exc
        return model


class NeverRun(torch.nn.Module):
    """Stands for a block after the deepest requested one where the list must keep its length.

    It holds no parameters (nothing is loaded for it) and running it is a bug: the forward ends
    inside the deepest tapped block.
    """

    def forward(self, *args, **kwargs):
        raise RuntimeError("a DiT block after the deepest requested block was run")


@contextlib.contextmanager
def parameters_on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init) and real buffers.

    Buffers stay real because some are computed in `__init__` and not stored in checkpoints
    (e.g. PixArt's sin-cos position table); every parameter is read from the checkpoint later.
    The default dtype is the model dtype while building, as in diffusers' `from_pretrained`.
    """
    from diffusers.models.modeling_utils import no_init_weights

    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    previous = torch.get_default_dtype()
    torch.nn.Module.register_parameter = register
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.nn.Module.register_parameter = original
        torch.set_default_dtype(previous)


#: bytes per element of safetensors' dtype names
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def read_tensors(
    files: dict[Path, list[str]], dtypes: dict[str, torch.dtype], batch_bytes: int = 256 * 2**20
) -> dict[str, torch.Tensor]:
    """The named tensors only, each cast to its dtype (`safe_open` reads tensor by tensor).

    Every tensor is copied out of the file mapping into its own allocation (as `from_pretrained`
    does): a tensor left in the mapping sits at whatever offset the file gives it, and CPU
    kernels may round the last bit differently for differently aligned weights. Mapped pages a
    read touches count as resident until the file is closed, so it is reopened every
    `batch_bytes`: at most one batch of source pages sits next to the copies.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path, names in files.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            sizes = {}
            for name in names:
                piece = handle.get_slice(name)
                count = 1
                for side in piece.get_shape():
                    count *= side
                sizes[name] = count * _ITEMSIZE.get(piece.get_dtype(), 1)
        batches: list[list[str]] = [[]]
        total = 0
        for name in names:
            if batches[-1] and total + sizes[name] > batch_bytes:
                batches.append([])
                total = 0
            batches[-1].append(name)
            total += sizes[name]
        for batch in batches:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in batch:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(dtypes[name]) if tensor.dtype != dtypes[name] else tensor.clone()
    return out
