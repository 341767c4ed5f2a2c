"""Loading shared by the diffusers-backed adapters.

A model is a diffusers pipeline folder (hub id or local directory, as `save_pretrained` writes
it). The text side (tokenizers + encoders) and the DiT side (transformer + VAE) are loaded
separately, so the text encoders can be freed before the DiT is put on the device. Tiny models
are built from config with seeded random weights and go through the same code afterwards;
`save_pipeline` writes them as an ordinary pipeline folder that `--weights DIR` loads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DitfError
from ..hub import looks_local, refuse_pickled
from ..hub import offline as _offline
from .base import DiTAdapter, LatentPosterior, ModelSpec, PromptEmbedding


class DiffusersAdapter(DiTAdapter):
    """Adapter whose weights live in a diffusers pipeline folder."""

    #: diffusers pipeline class of the family (text encoding and the folder layout)
    pipeline_cls: type
    #: pipeline components needed to encode prompts
    text_components: tuple[str, ...] = ()
    #: the VAE stays in fp32 under a bf16 / fp16 DiT, as the authors' autoencoder does
    vae_dtype = torch.float32

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._text_pipe = None
        self._transformer = None
        self._vae = None
        self._tiny_components: dict | None = None
        self._local: str | None = None

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
    def _from_pretrained_kwargs(self) -> dict:
        # safetensors only: pickled .bin weights would run arbitrary code when loaded
        return {"dtype": self.dtype, "use_safetensors": True, "local_files_only": _offline()}

    def _check_source(self) -> None:
        if self.source is None:
            return
        path = Path(self.source)
        if looks_local(self.source):
            if not (path / "model_index.json").is_file():
                raise DitfError(f"--weights {self.source}: not a diffusers pipeline folder (no model_index.json)")
            refuse_pickled(path)

    def _folder(self) -> str:
        """The weights as a local pipeline folder. A hub id is fetched (or found in the cache) once,
        safetensors only, by diffusers' pipeline downloader at --revision; every component then loads
        from that folder. (Loading a component straight from a hub id goes through diffusers'
        config loader, which passes huggingface_hub's deprecated `local_dir_use_symlinks` and prints
        its warning.)"""
        self._check_source()
        if self._local is None:
            if looks_local(self.source):
                self._local = self.source
            else:
                self._local = str(self._load(lambda: self.pipeline_cls.download(
                    self.source, revision=self.revision, local_files_only=_offline(), use_safetensors=True,
                ), "weights"))
                refuse_pickled(self._local)
        return self._local

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
            pipe.to(self.device)
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
            module = self._tiny()[name].to(self.device)
            return module if module.dtype == dtype else module.to(dtype)
        self._check_source()
        cls = self.dit_classes()[name]
        module = self._load(
            lambda: cls.from_pretrained(self._folder(), subfolder=name, **{**self._from_pretrained_kwargs(), "dtype": dtype}),
            name,
        )
        return module.to(self.device).eval().requires_grad_(False)

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
    def stack_prompt(prompt: PromptEmbedding, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """Repeat one prompt's embeddings over the batch (the ensemble shares the prompt)."""
        return {
            name: value.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *value.shape).contiguous()
            for name, value in prompt.items()
            if value.is_floating_point()
        }


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
