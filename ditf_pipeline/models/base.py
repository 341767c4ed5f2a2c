"""The one small interface every DiT family implements.

An adapter answers four questions about its family and nothing else (it knows nothing of Zarr,
datasets or matching):

* which blocks exist (`architecture`, `num_blocks`, `block_kind`: read from the loaded
  checkpoint's config where the family can, so a `--weights` folder of another width or depth
  is described as it is),
* how an image becomes noisy latents at timestep t (`encode_posterior` once per image, then
  `LatentPosterior.sample` and `add_noise` per ensemble member),
* how a prompt becomes the conditioning the DiT takes (`encode_prompts`),
* where the pre-AdaLN feature z and the block's AdaLN (shift, scale, gate) are captured
  (`forward_intermediates`, modelled on timm's ``forward_intermediates(indices, stop_early)``),
  and what the modulation would be under the conditioning ablation (`modulation`).

Weights come from a diffusers pipeline folder or hub id through ``from_pretrained``; the tiny
variants are built from config with seeded random weights. Text encoders are loaded lazily,
only to encode prompts not cached yet, and freed with `release_text_encoders` before the DiT
runs.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Conditioning = Literal["tc", "t", "c"]
#: Prompt conditioning as the family's DiT consumes it, e.g. {"prompt_embeds": [L, C],
#: "pooled_prompt_embeds": [C']}: tensors without batch dimension (cacheable in the store).
PromptEmbedding = dict[str, torch.Tensor]
#: What a forward is conditioned on: one embedding shared by every row, or one per image when
#: images are batched together (embedding i serves rows i*m .. (i+1)*m - 1 of a batch of n*m).
Prompts = PromptEmbedding | Sequence[PromptEmbedding]


@dataclass(frozen=True)
class CompileOptions:
    """How the DiT blocks that run are compiled (`torch.compile`, one block at a time).

    Per block, not the whole model: the blocks of a family share one code object, so one
    compiled graph serves all of them (compile time does not grow with k), the early exit stays
    the truncated block list (nothing is raised inside a compiled graph), and the tapped blocks
    run eagerly with their capture hooks. `fullgraph=False` in production: a graph break on
    another diffusers version costs speed, not the run; the tests compile with `fullgraph=True`
    to prove there is none. `dynamic=None`: a second token grid makes the sizes symbolic
    instead of compiling once per aspect ratio.
    """

    backend: str = "inductor"
    fullgraph: bool = False
    dynamic: bool | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: a name users type and the paper's defaults for it."""

    name: str
    family: str
    hub_id: str | None  # None for tiny models built from config
    num_blocks: int
    hidden_size: int
    default_k: int
    default_t: int
    img_size: int  # long side in pixels, default preprocessing
    guidance: float | None = None
    description: str = ""
    tiny: bool = False
    #: licence of the weights as their model card states it (the code's MIT licence does not cover them)
    license: str = ""
    #: None: `default_k` / `default_t` are the paper's, tuned on real weights; else the rule they
    #: come from (`rule_defaults`), not tuned on real weights
    defaults_rule: str | None = None
    #: extra constructor arguments for the adapter (e.g. the tiny config)
    options: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Architecture:
    """What the weights in use are: width and block layout, read from the loaded checkpoint.

    `blocks` lists runs of (kind, count) in the paper's block numbering, e.g. Flux
    (("double", 19), ("single", 38)); a `--weights` folder may differ from the registry entry
    (another width, fewer blocks), so the store's arrays and the block numbering follow this,
    never `ModelSpec.hidden_size` / `num_blocks`.
    """

    width: int
    blocks: tuple[tuple[str, int], ...]
    #: the diffusers transformer class the weights are (None for models that are not one)
    cls: str | None = None
    #: the modulated norm: "layer" (affine-free LayerNorm, then scale and shift) or "rms"
    #: (RMSNorm with a learned weight, then scale only)
    norm: str = "layer"

    @property
    def num_blocks(self) -> int:
        return sum(count for _, count in self.blocks)

    def kind(self, block_index: int) -> str:
        start = 0
        for kind, count in self.blocks:
            if block_index < start + count:
                return kind
            start += count
        raise IndexError(block_index)

    def describe(self) -> str:
        """e.g. "19 double + 38 single blocks, width 3072"."""
        runs = " + ".join(f"{count} {kind}" for kind, count in self.blocks)
        return f"{runs} blocks, width {self.width}"

    def as_config(self) -> dict:
        """The store-config entry: keys written from different architectures never mix."""
        config = {"width": self.width, "blocks": [[kind, count] for kind, count in self.blocks]}
        if self.cls is not None:
            config["class"] = self.cls
        if self.norm != "layer":  # absent means LayerNorm: keys written before the field stay valid
            config["norm"] = self.norm
        return config


#: the paper's relative depth: k = blocks // 2 reproduces its PixArt-alpha (14 of 28) and Flux
#: (28 of 57) defaults
RULE_DEPTH = 0.5
#: the paper's timestep per noise schedule: Flux's for rectified-flow training, PixArt-alpha's for DDPM
RULE_T = {"flow": 260, "ddpm": 141}


def rule_defaults(num_blocks: int, schedule: str) -> tuple[int, int, str]:
    """(k, t, the rule in words) for a family the paper did not tune: its relative depth and noise level.

    Stated as a rule, not a finding: no real weights were measured. `ditf analyze --match`
    over a k x t grid on a split is what tunes them.
    """
    k = int(num_blocks * RULE_DEPTH)
    t = RULE_T[schedule]
    return k, t, (f"k = blocks // 2, t = {t} ({'rectified flow: Flux' if schedule == 'flow' else 'DDPM: PixArt-alpha'}"
                  "'s); not tuned on real weights")


@dataclass
class Modulation:
    """The AdaLN vectors of one block, each (B, D) float32 (or (D,) for `DiTAdapter.modulation`).

    LayerNorm families have all three of shift, scale, gate. Scale-only RMSNorm families
    (Lumina-Image 2.0, Z-Image: ``rmsnorm(z) * norm_weight * (1 + scale)``) have no shift
    (None: absent, never zeros) and carry the norm's learned weight as `norm_weight`, repeated
    per row so that every stored image stays self-contained.
    """

    shift: torch.Tensor | None
    scale: torch.Tensor
    gate: torch.Tensor
    norm_weight: torch.Tensor | None = None

    def vectors(self) -> dict[str, torch.Tensor]:
        """The vectors present, by their stored name (absent ones are left out, not zero-filled)."""
        named = {"shift": self.shift, "scale": self.scale, "gate": self.gate, "norm_weight": self.norm_weight}
        return {name: value for name, value in named.items() if value is not None}


@dataclass
class BlockFeatures:
    """What one block contributes to the cache.

    pre_adaln: (B, h, w, D) the raw residual stream the block's AdaLN normalises (image tokens
    only, on the h x w token grid); modulation: that block's own (shift, scale, gate), or None
    for models without AdaLN (DINOv2, the SD UNet: `pre_adaln` is then simply the layer's
    output feature map and only the ``raw`` variant applies).
    """

    pre_adaln: torch.Tensor
    modulation: Modulation | None


@dataclass
class LatentPosterior:
    """The VAE's diagonal Gaussian of a batch of images, and how a sample becomes DiT latents.

    Encoding once and drawing every ensemble member from this one posterior gives the same
    distribution as encoding each member's copy of the image (the authors' eight copies share
    one posterior), at an eighth of the VAE cost. `sample(eps)` is the authors' arithmetic:
    ``scale * ((mean + std * eps) - shift)`` in the VAE's dtype (fp32), then cast to the DiT's.
    """

    mean: torch.Tensor  # (B, C, h, w) in the VAE's dtype
    std: torch.Tensor | None  # same shape; None: deterministic (no VAE, e.g. DINOv2's pixels)
    dtype: torch.dtype  # what the DiT takes
    shift: float = 0.0
    scale: float = 1.0

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Latents x0 for standard-normal `eps` (broadcast: a (1, ...) posterior, (n, ...) eps -> n samples)."""
        z = self.mean
        if eps is not None and self.std is not None:
            z = z + self.std * eps.to(device=z.device, dtype=z.dtype)
        if self.shift or self.scale != 1.0:
            z = (z - self.shift) * self.scale
        return z.to(self.dtype)


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block to end the forward early."""


class DiTAdapter(ABC):
    """Base class of the per-family adapters (`flux`, `sd3`, `pixart`)."""

    #: pixels per token side (VAE factor 8 x patch 2)
    patch_stride: int = 16
    #: False for models without AdaLN: no modulation is captured or stored, only variant ``raw``
    has_adaln: bool = True
    #: the norm the captured modulation applies: "layer" (shift, scale, gate) or "rms" (a learned
    #: RMSNorm weight, scale and gate, no shift)
    modulated_norm: str = "layer"
    #: False where the AdaLN sees the timestep only (PixArt, Sana): no t-only / c-only vectors
    #: are stored, and `modulation(..., "c")` raises a one-line error naming the family
    separates_conditioning: bool = True
    #: False for deterministic models (no noise): the extractor uses an ensemble of one
    stochastic: bool = True
    #: False for models without text conditioning: the extractor uses the prompt mode ``none``
    conditioned: bool = True
    #: dtype the VAE runs in whatever the DiT's (the authors keep theirs in fp32); None: no VAE
    vae_dtype: torch.dtype | None = None

    def __init__(
        self,
        spec: ModelSpec,
        weights: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        text_device: str | torch.device | None = None,
        offload: bool = False,
    ) -> None:
        self.spec = spec
        #: hub id or local folder; None means build the tiny model from config
        self.source = weights if weights is not None else spec.hub_id
        self.revision = revision
        self.dtype = dtype
        self.device = torch.device(device)
        #: where the text encoders run (they are freed before the DiT runs); default: `device`
        self.text_device = torch.device(text_device) if text_device is not None else self.device
        #: keep the DiT's blocks in host memory and move one at a time to `device` (families that support it)
        self.offload = offload
        #: None: the blocks run eagerly; else how the untapped blocks are compiled (`set_compile`)
        self.compile_options: CompileOptions | None = None

    def set_compile(self, options: CompileOptions | None) -> None:
        """Compile the DiT blocks that run from the next forward on (None: eager again).

        Families without block lists (DINOv2, the SD UNet) ignore it and run eagerly.
        """
        self.compile_options = options

    # ---- blocks ---------------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        """Width and blocks of the weights in use; the registry's values unless a family reads its checkpoint."""
        return Architecture(self.spec.hidden_size, (("block", self.spec.num_blocks),))

    @property
    def num_blocks(self) -> int:
        return self.architecture.num_blocks

    def block_kind(self, block_index: int) -> str:
        """A short label for the block type ("double", "single", "joint", ...)."""
        return self.architecture.kind(block_index)

    def refuse_conditioning_c(self, conditioning: str, why: str) -> None:
        """Refuse c-only conditioning for a family whose modulation never sees the text.

        `why` completes "undefined for the F family, ..." (e.g. "whose AdaLN is conditioned on the
        timestep only"): the one-line error names the family and the reason, and any other unknown
        conditioning is refused too.
        """
        from ..core.errors import DitfError

        if conditioning == "c":
            raise DitfError(f"{self.spec.name}: conditioning 'c' is undefined for the {self.spec.family} family, "
                            f"{why}; use 't' or 'tc'")
        if conditioning not in ("t", "tc"):
            raise DitfError(f"unknown conditioning {conditioning!r}; choose one of tc, t, c")

    def check_indices(self, indices: Sequence[int]) -> list[int]:
        from ..core.errors import DitfError

        bad = [k for k in indices if not 0 <= k < self.num_blocks]
        if bad:
            origin = f" from {self.source}" if self.source and self.source != self.spec.hub_id else ""
            raise DitfError(
                f"block index {bad[0]} is out of range for {self.spec.name}{origin} "
                f"({self.architecture.describe()}: blocks 0..{self.num_blocks - 1})"
            )
        return sorted(set(int(k) for k in indices))

    # ---- prompts --------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        """Encode prompts with the family's text encoders (loaded on first use)."""

    def release_text_encoders(self) -> None:
        """Free the text encoders so they are never resident while the DiT runs.

        Subclasses drop their references first, then call this to return the memory.
        """
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- images ---------------------------------------------------------------------------
    def prepare_image(self, img, img_size: int, side: str = "long", resample: str = "pil-bicubic"):
        """PIL image -> model input pixels, float32 (3, H, W) numpy.

        Default (the DiTs): the `side` ("long", or "short" for DiTF's DAVIS rule) to
        `img_size`, sides rounded to multiples of `patch_stride`, aspect kept (see
        `images.model_size`), resampled with `resample` (`images.RESAMPLERS`), then
        `normalise_pixels`.
        """
        from ..core.images import preprocess

        return self.normalise_pixels(
            preprocess(img, img_size, multiple=self.patch_stride, side=side, resample=resample)
        )

    def grid_size(self, width: int, height: int, img_size: int, side: str = "long") -> tuple[int, int]:
        """(rows, cols) of the token grid `prepare_image` leads to for an image of this size."""
        from ..core.images import model_size

        new_w, new_h = model_size(width, height, img_size, self.patch_stride, side)
        return new_h // self.patch_stride, new_w // self.patch_stride

    def normalise_pixels(self, pixels):
        """Pixels in [-1, 1] (what `images.preprocess` returns) -> what the model takes (VAE: as is)."""
        return pixels

    def input_config(self) -> dict:
        """Store-config entries describing `prepare_image` (they must match to reuse a key)."""
        return {"resize": f"long side to img_size, sides rounded to multiples of {self.patch_stride}, aspect kept"}

    def feature_shape(self, img_size: int, block_index: int) -> tuple[int, int, int]:
        """(rows, cols, channels) the store must hold for block k at `img_size` (largest grid)."""
        side = max(1, round(img_size / self.patch_stride))
        return side, side, self.architecture.width

    @abstractmethod
    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        """VAE-encode (B, 3, H, W) pixels in [-1, 1] once: the posterior the latents x0 are drawn from."""

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One posterior sample per row of (B, 3, H, W) pixels: latents x0 the DiT denoises.

        The posterior is *sampled* (as the public script does), with standard-normal draws from
        `generator` (on the CPU, so the numbers do not depend on the device).
        """
        posterior = self.encode_posterior(pixels)
        eps = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
        return posterior.sample(eps if posterior.std is not None else None)

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """Noise x0 to x_t as the family's training schedule defines it (t in 0..999)."""

    # ---- the DiT --------------------------------------------------------------------------
    @abstractmethod
    def forward_intermediates(
        self,
        noisy_latents: torch.Tensor,
        prompt: Prompts,
        timestep: int,
        indices: Sequence[int],
        stop_early: bool = True,
    ) -> dict[int, BlockFeatures]:
        """Run the DiT on a batch and capture the blocks.

        `prompt`: one embedding shared by the batch, or one per image of images batched
        together (see `Prompts`). One forward serves all requested blocks; with `stop_early`
        nothing after the deepest one is computed.
        """

    @abstractmethod
    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        """The AdaLN vectors regressed from (t, c), t alone or c alone (paper Table 5).

        These depend only on (t, c), not on the image, so they are computed without a forward.
        For "tc" they equal what `forward_intermediates` captures. Families whose AdaLN sees t
        only (PixArt) raise `DitfError` for "c". `image_size` (H, W of the model input in pixels)
        matters only to families with size micro-conditioning (PixArt-XL-1024).
        """

    # ---- capture shared by the families ------------------------------------------------------
    def capture(self, taps: dict[int, "BlockTap"], forward, stop_early: bool = True) -> dict[int, BlockFeatures]:
        """Run `forward()` once with every block's taps installed; stop after the deepest block.

        Each family only says *where* its tensors live (`BlockTap`); hooking, ordering and the
        early exit (an exception from the deepest block's feature hook, caught here: independent
        of the diffusers version) are written once. The diffusers families also cut their block
        lists after the deepest block for the forward (`DiffusersAdapter._blocks_that_run`), so
        the exception only skips the rest of that eager block and never crosses a compiled one.
        """
        captured: dict[int, BlockFeatures] = {}
        modulation: dict[int, Modulation] = {}
        deepest = max(taps)
        hooks = []
        for k, tap in taps.items():
            if tap.modulation_module is not None:
                def on_modulation(module, args, kwargs, *output, k=k, tap=tap):
                    modulation[k] = tap.read_modulation(args, kwargs, output[0] if output else None)

                hooks.append((tap.modulation_module, tap.modulation_hook, on_modulation))

            def on_feature(module, args, kwargs, *output, k=k, tap=tap):
                feature = tap.read_feature(args, kwargs, output[0] if output else None)
                captured[k] = BlockFeatures(pre_adaln=feature, modulation=modulation.get(k))
                if stop_early and k == deepest:
                    raise _StopForward

            hooks.append((tap.feature_module, tap.feature_hook, on_feature))
        handles = []
        try:
            for module, kind, hook in hooks:
                register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                handles.append(register(hook, with_kwargs=True))
            with torch.no_grad():
                try:
                    forward()
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return captured


@dataclass
class BlockTap:
    """Where block k's tensors are read during a forward.

    `read_feature(args, kwargs, output)` of `feature_module`'s forward ("pre" hook: output is
    None) returns the pre-AdaLN z as (B, h, w, D) image tokens; for AdaLN blocks,
    `read_modulation(args, kwargs, output)` of `modulation_module` returns the block's own
    (shift, scale, gate) and must fire before the feature hook.
    """

    feature_module: torch.nn.Module
    feature_hook: str
    read_feature: Callable
    modulation_module: torch.nn.Module | None = None
    modulation_hook: str = "post"
    read_modulation: Callable | None = None
