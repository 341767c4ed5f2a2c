"""The lifecycle shared by the diffusers-backed adapters: load, place, offload, compile, release.

A model is a diffusers pipeline folder (hub id or local directory, as `save_pretrained` writes
it), read by `checkpoint.Checkpoint`: its transformer is never loaded whole, only the blocks up
to the deepest one asked for (its architecture from `transformer/config.json`). The text side
(tokenizers + encoders) and the DiT side (transformer + VAE) are loaded separately, so the text
encoders can be freed before the DiT is put on the device. Tiny models are built from config
with seeded random weights and go through the same code afterwards; `save_pipeline` writes them
as an ordinary pipeline folder that `--weights DIR` loads back. With `offload`, the blocks stay
in host memory and `BlockStreamer` moves one at a time to the device. With `set_compile`, each
forward runs the block lists cut after the deepest tapped block, the untapped blocks compiled
one at a time (`_blocks_that_run`). A family adds one file: its adapter subclass.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..core.errors import DitfError
from .base import Architecture, BlockFeatures, CompileOptions, DiTAdapter, LatentPosterior, ModelSpec, Prompts
from .checkpoint import Checkpoint, NeverRun
from .compiled import DynamicBlock
from .hub import offline as _offline

__all__ = ["BlockStreamer", "DiffusersAdapter", "RectifiedFlowNoise", "chunk_modulation", "time_text_parts"]


class DiffusersAdapter(DiTAdapter):
    """Adapter whose weights live in a diffusers pipeline folder."""

    #: diffusers pipeline class of the family (text encoding and the folder layout)
    pipeline_cls: type
    #: pipeline components needed to encode prompts
    text_components: tuple[str, ...] = ()
    #: the VAE stays in fp32 under a bf16 / fp16 DiT, as the authors' autoencoder does
    vae_dtype = torch.float32
    #: the transformer's block lists in the paper's numbering: (attribute, config entry giving
    #: its length, kind); empty for models without a transformer (the SD UNet)
    block_lists: tuple[tuple[str, str, str], ...] = ()
    #: config entries whose product is the hidden width (heads x head size in most families)
    width_entries: tuple[str, ...] = ("num_attention_heads", "attention_head_dim")
    #: True where the transformer's forward reads its block lists' lengths (Chroma indexes its
    #: modulation table by them): cut lists keep their length, the blocks after the cut replaced
    #: by parameter-free `NeverRun` placeholders
    keep_list_lengths: bool = False

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._text_pipe = None
        self._transformer = None
        self._vae = None
        self._tiny_components: dict | None = None
        self._checkpoint: Checkpoint | None = None
        self._transformer_config: dict | None = None
        #: deepest block asked for so far (the transformer holds blocks 0..this); None: all
        self._depth: int | None = None
        #: deepest block the loaded transformer holds
        self._loaded_depth: int | None = None
        self._streamer: BlockStreamer | None = None
        #: {id(block): the block compiled}; emptied when the transformer or the options change
        self._compiled: dict[int, torch.nn.Module] = {}
        #: hub download options of the Python API (`cache_dir`, `token`, `local_files_only`)
        self.hub_options: dict = {}

    # ---- tiny models ------------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        """All pipeline components at toy size, seeded (tiny specs only)."""
        raise NotImplementedError

    def _tiny(self) -> dict:
        if self._tiny_components is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.spec.options.get("seed", 0))
                components = self.build_tiny_components()
            for module in components.values():
                if isinstance(module, torch.nn.Module):
                    module.eval().requires_grad_(False)
            self._tiny_components = components
        return self._tiny_components

    def save_pipeline(self, directory: str | Path) -> Path:
        """Write the model as a diffusers pipeline folder (used to test `--weights DIR`)."""
        components = self._tiny() if self.source is None else self._load_all_from_source()
        pipe = self.pipeline_cls(**components)
        pipe.save_pretrained(str(directory))
        return Path(directory)

    # ---- loading ----------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        """The reader of `source` (not for tiny models), made again when `hub_options` are replaced."""
        if self._checkpoint is None or self._checkpoint.hub_options is not self.hub_options:
            self._checkpoint = Checkpoint(self.source, self.revision, self.hub_options, self.pipeline_cls)
        return self._checkpoint

    def _from_pretrained_kwargs(self) -> dict:
        # safetensors only: pickled .bin weights would run arbitrary code when loaded
        return {"dtype": self.dtype, "use_safetensors": True, **self.checkpoint.hub_kwargs()}

    def _check_source(self) -> None:
        if self.source is not None:
            self.checkpoint.check()

    def _folder(self) -> str:
        """The weights as a local pipeline folder (a hub id downloaded once: `Checkpoint.folder`)."""
        self._check_source()
        return self._load(self.checkpoint.folder, "weights")

    def _load_all_from_source(self) -> dict:
        pipe = self.pipeline_cls.from_pretrained(self._folder(), **self._from_pretrained_kwargs())
        return dict(pipe.components)

    def _load(self, loader, what: str):
        from . import quiet_libraries  # loading logs advice about the checkpoint's layout, not for our users

        try:
            with quiet_libraries():
                return loader()
        except DitfError:
            raise
        except (OSError, ValueError, EnvironmentError) as exc:
            hint = " (offline: HF_HUB_OFFLINE is set)" if _offline() else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DitfError(f"cannot load the {what} of {self.spec.name} from {self.source}{hint}: {first}") from exc

    # ---- architecture -------------------------------------------------------------------------
    def transformer_config(self) -> dict:
        """The transformer's config as the checkpoint states it (read once; no weights loaded)."""
        if self._transformer_config is None:
            if self.source is None:
                config = dict(self._tiny()["transformer"].config)
            else:
                self._check_source()
                config = self._load(self.checkpoint.transformer_config, "transformer config")
                expected = self.dit_classes()["transformer"].__name__
                if config.get("_class_name") != expected:
                    raise DitfError(
                        f"--weights {self.source}: its transformer is a {config.get('_class_name')}, not the {expected} "
                        f"model {self.spec.name} needs (another model family)"
                    )
            self._transformer_config = config
        return self._transformer_config

    @property
    def architecture(self) -> Architecture:
        """Width and block lists from the transformer's config, not from the registry."""
        if not self.block_lists:
            return super().architecture
        config = self.transformer_config()
        missing = [entry for entry in self.width_entries if entry not in config]
        missing += [entry for _, entry, _ in self.block_lists if entry not in config]
        if missing:
            raise DitfError(f"the transformer config of {self.source} lacks {', '.join(missing)}")
        self.check_config(config)
        width = self.width_of(config)
        return Architecture(width, tuple((kind, int(config[entry])) for _, entry, kind in self.block_lists),
                            cls=self.dit_classes()["transformer"].__name__, norm=self.modulated_norm)

    def width_of(self, config: dict) -> int:
        """The transformer's hidden width: the product of its `width_entries` in the config."""
        return math.prod(int(config[entry]) for entry in self.width_entries)

    def check_config(self, config: dict) -> None:
        """Family-specific checks of the transformer's config before it is used (none by default)."""

    def check_indices(self, indices: Sequence[int]) -> list[int]:
        """Validate against the checkpoint's blocks; the transformer then holds blocks up to the deepest."""
        indices = super().check_indices(indices)
        if indices and self.block_lists:
            self._need_blocks(indices[-1])
        return indices

    def _need_blocks(self, k: int) -> None:
        """Remember that block k is needed; a transformer loaded shallower is dropped and reloaded deeper."""
        if self._depth is not None and k <= self._depth:
            return
        self._depth = k
        if self._transformer is not None and self._loaded_depth is not None and self._loaded_depth < k:
            self._transformer = self._streamer = None
            self._loaded_depth = None
            self._compiled.clear()

    def text_pipe(self):
        """The pipeline holding only the text side, on the device, loaded on first use."""
        if self._text_pipe is None:
            if self.source is None:
                tiny = self._tiny()
                parts = {name: tiny[name] for name in self.text_components}
            else:
                parts = self._load(
                    lambda: {
                        name: component
                        for name, component in self.pipeline_cls.from_pretrained(
                            self._folder(),
                            **self._from_pretrained_kwargs(),
                            **{name: None for name in self.dit_components()},
                        ).components.items()
                        if name in self.text_components
                    },
                    "text encoders",
                )
            empty = {name: None for name in self.dit_components()}
            pipe = self.pipeline_cls(**parts, **empty)
            pipe.to(self.text_device)
            self._text_pipe = pipe
        return self._text_pipe

    def dit_components(self) -> tuple[str, ...]:
        """Pipeline components that are not on the text side."""
        import inspect

        names = [p for p in inspect.signature(self.pipeline_cls.__init__).parameters if p != "self"]
        return tuple(n for n in names if n not in self.text_components)

    def release_text_encoders(self) -> None:
        self._text_pipe = None
        super().release_text_encoders()

    def _load_dit_part(self, name: str, dtype: torch.dtype | None = None):
        dtype = dtype or self.dtype
        if self.source is None:
            module = self._tiny()[name]
            module = module if module.dtype == dtype else module.to(dtype)
        elif name == "transformer" and self.block_lists:
            self._check_source()
            module = self._load(self._load_truncated_transformer, name)
        else:
            self._check_source()
            cls = self.dit_classes()[name]
            module = self._load(
                lambda: cls.from_pretrained(self._folder(), subfolder=name, **{**self._from_pretrained_kwargs(), "dtype": dtype}),
                name,
            )
        if name == "transformer" and self.offload and self.block_lists:
            self._streamer = BlockStreamer.place(module, [attr for attr, _, _ in self.block_lists], self.device)
            return module.eval().requires_grad_(False)
        return module.to(self.device).eval().requires_grad_(False)

    def _load_truncated_transformer(self) -> torch.nn.Module:
        """The transformer cut after block `_depth` (`Checkpoint.truncated_transformer`)."""
        depth = self.num_blocks - 1 if self._depth is None else self._depth
        model = self.checkpoint.truncated_transformer(self.dit_classes()["transformer"], self.transformer_config(),
                                                      self.block_lists, depth, self.dtype, self.keep_list_lengths)
        self._loaded_depth = depth
        return model

    def set_compile(self, options: CompileOptions | None) -> None:
        if options is not None and self.offload:
            raise DitfError(f"{self.spec.name}: compiled blocks cannot be streamed (offload moves each block between "
                            "host and device on every call)")
        super().set_compile(options)
        self._compiled.clear()

    def capture(self, taps, forward, stop_early: bool = True) -> dict[int, BlockFeatures]:
        """As the base class, with the transformer's block lists as this forward runs them
        (`_blocks_that_run`); with offload the block left on the device by the early exit goes back."""
        try:
            with self._blocks_that_run(set(taps), stop_early):
                return super().capture(taps, forward, stop_early)
        finally:
            if self._streamer is not None:
                self._streamer.evict()

    @contextlib.contextmanager
    def _blocks_that_run(self, tapped: set[int], stop_early: bool) -> Iterator[None]:
        """The block lists cut after the deepest tapped block, untapped blocks compiled if asked.

        The cut makes the early exit a property of the block list: no block after the deepest
        is ever called, compiled or not. Tapped blocks stay eager, so their capture hooks (and
        the exception that ends the forward inside the deepest one, before its MLP) never sit
        inside a compiled graph. The lists are put back afterwards: the module is unchanged.
        """
        if not self.block_lists or (not stop_early and self.compile_options is None):
            yield
            return
        transformer = self.transformer
        deepest = max(tapped)
        saved: dict[str, torch.nn.Module] = {}
        start = 0
        for (attr, _, _), (_, count) in zip(self.block_lists, self.architecture.blocks):
            blocks = list(getattr(transformer, attr))
            keep = [block for i, block in enumerate(blocks) if not stop_early or start + i <= deepest]
            saved[attr] = getattr(transformer, attr)
            run = [block if start + i in tapped else self._compiled_block(block) for i, block in enumerate(keep)]
            if self.keep_list_lengths:
                run += [NeverRun() for _ in range(len(blocks) - len(keep))]
            setattr(transformer, attr, torch.nn.ModuleList(run))
            start += count
        try:
            yield
        finally:
            for attr, blocks in saved.items():
                setattr(transformer, attr, blocks)

    def _compiled_block(self, block: torch.nn.Module) -> torch.nn.Module:
        """`block` compiled per `compile_options` (made once per block), or itself when not compiling."""
        options = self.compile_options
        if options is None:
            return block
        compiled = self._compiled.get(id(block))
        if compiled is None:  # the compiled module holds the block, so its id cannot be reused meanwhile
            compiled = DynamicBlock(block, backend=options.backend, fullgraph=options.fullgraph, dynamic=options.dynamic)
            self._compiled[id(block)] = compiled
        return compiled

    def dit_classes(self) -> dict[str, type]:
        """diffusers classes of the transformer and the VAE."""
        raise NotImplementedError

    @property
    def transformer(self):
        if self._transformer is None:
            self._transformer = self._load_dit_part("transformer")
        return self._transformer

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self._load_dit_part("vae", self.vae_dtype)
        return self._vae

    # ---- shared image side ------------------------------------------------------------------
    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        vae = self.vae
        pixels = pixels.to(device=self.device, dtype=vae.dtype)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        return LatentPosterior(
            mean=posterior.mean, std=posterior.std, dtype=self.dtype,
            shift=float(getattr(vae.config, "shift_factor", None) or 0.0), scale=float(vae.config.scaling_factor),
        )

    @staticmethod
    def stack_prompt(prompt: Prompts, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """The prompt embeddings as (batch, ...) tensors: one embedding repeated over the batch
        (the ensemble shares it), or n embeddings each repeated over batch / n consecutive rows
        (images batched together, each with its ensemble)."""
        prompts = [prompt] if isinstance(prompt, dict) else list(prompt)
        if not prompts or batch % len(prompts):
            raise ValueError(f"{len(prompts)} prompt(s) cannot condition a batch of {batch} rows")
        repeat = batch // len(prompts)

        def rows(name: str) -> torch.Tensor:
            stacked = torch.stack([p[name].to(device=device, dtype=dtype) for p in prompts])
            # expand + reshape, not repeat_interleave: no output size for the device to report back
            return stacked.unsqueeze(1).expand(len(prompts), repeat, *stacked.shape[1:]).reshape(batch, *stacked.shape[1:])

        return {name: rows(name) for name, value in prompts[0].items() if value.is_floating_point()}


class BlockStreamer:
    """Keeps a transformer's blocks in host memory and moves one at a time to the device.

    Every submodule of a block gets a forward pre-hook that brings its block to the device
    (sending the previous one back), so the model's own forward, the capture hooks and direct
    calls such as `norm.linear(...)` in `modulation` all work unchanged. Sending back costs
    nothing: the host copy is kept and the device copy dropped. Only one block is on the
    device at any time; everything outside the blocks (embedders, output head) stays there.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.resident: torch.nn.Module | None = None
        self.moves = 0
        self._host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        pin = device.type == "cuda"
        for block in blocks:
            tensors = list(itertools.chain(block.parameters(), block.buffers()))
            entries = []
            for tensor in tensors:
                host = tensor.data.to("cpu")
                host = host.pin_memory() if pin else host
                tensor.data = host
                entries.append((tensor, host))
            self._host[id(block)] = entries
            for module in block.modules():
                module.register_forward_pre_hook(lambda *_, block=block: self.bring(block))

    @classmethod
    def place(cls, model: torch.nn.Module, block_attrs: Sequence[str], device: torch.device) -> "BlockStreamer":
        """Everything but the blocks to `device`; the blocks to host memory, streamed."""
        for name, child in model.named_children():
            if name not in block_attrs:
                child.to(device)
        for tensor in itertools.chain(model._parameters.values(), model._buffers.values()):
            if tensor is not None:
                tensor.data = tensor.data.to(device)
        return cls([block for attr in block_attrs for block in getattr(model, attr)], device)

    def bring(self, block: torch.nn.Module) -> None:
        if self.resident is block:
            return
        self.evict()
        for tensor, host in self._host[id(block)]:
            # copy=True: a real move even when device is the CPU, so CPU tests run the same steps
            tensor.data = host.to(self.device, non_blocking=True, copy=True)
        self.resident = block
        self.moves += 1

    def evict(self) -> None:
        if self.resident is not None:
            for tensor, host in self._host[id(self.resident)]:
                tensor.data = host
            self.resident = None

    def on_device(self, block: torch.nn.Module) -> bool:
        """Whether the block's tensors are device copies (read from the tensors, not the bookkeeping)."""
        return any(tensor.data_ptr() != host.data_ptr() for tensor, host in self._host[id(block)])


class RectifiedFlowNoise:
    """Noise of the rectified-flow families (Flux, SD3): x_t = s * noise + (1 - s) * x0, s = t / 1000."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        sigma = timestep / 1000.0
        return sigma * noise + (1.0 - sigma) * latents


def time_text_parts(
    time_text_embed: torch.nn.Module,
    timestep: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split diffusers' Combined*TextProjEmbeddings into its t part and its c part.

    temb = timestep_embedder(t) [+ guidance_embedder(g)] + text_embedder(pooled): the sum the
    block AdaLNs see. The conditioning ablation (paper Table 5) feeds the AdaLN one part alone;
    guidance is a sampling setting, not the condition, so it stays with t.
    """
    proj = time_text_embed.time_proj(timestep)
    t_part = time_text_embed.timestep_embedder(proj.to(pooled.dtype))
    if guidance is not None and hasattr(time_text_embed, "guidance_embedder"):
        g_proj = time_text_embed.time_proj(guidance)
        t_part = t_part + time_text_embed.guidance_embedder(g_proj.to(pooled.dtype))
    c_part = time_text_embed.text_embedder(pooled)
    return t_part, c_part


def chunk_modulation(linear_output: torch.Tensor, parts: int, take: Sequence[int]):
    """(shift, scale, gate) from an AdaLN linear output split `parts` ways, items `take`."""
    chunks = linear_output.float().chunk(parts, dim=-1)
    return tuple(chunks[i] for i in take)
