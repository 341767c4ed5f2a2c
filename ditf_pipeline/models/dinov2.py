"""DINOv2 (ViT-S/B/L/G, patch 14), the ``DINOv2+NN`` baseline and the fusion partner of DiTF.

The feature is what sd-dino (Zhang et al., "A Tale of Two Features") and GeoAware-SC call the
``token`` facet: the output tokens of transformer block k (a forward hook on the block, so
*before* the model's final LayerNorm), patch tokens only (the CLS token dropped), on the
H/14 x W/14 patch grid. Their defaults: block 11 for ViT-S/14 and ViT-B/14, 23 for ViT-L/14,
39 for ViT-G/14 (the last block of each), input 840 px, stride 14 (no overlapping patches).

Everything else about the cache is shared with the DiTs: ``k`` is the block index, ``t`` is
always 0 (there is no timestep), and there is no AdaLN, so nothing but the raw feature map is
stored (`BlockFeatures.modulation` is None) and only the ``raw`` variant applies.

Input: long side to `img_size` (840), aspect kept, sides rounded to multiples of 14, bicubic,
pixels normalised with the ImageNet mean/std (``transforms.Normalize`` of their extractor).
They resize into a zero-padded 840 x 840 square instead; our cache keeps the un-padded image
on its own grid, and the geoaware matcher maps it into their frame.

Weights: `transformers.Dinov2Model` from the hub id (facebook/dinov2-*) or a local folder
(`--weights DIR` with config.json); position embeddings are interpolated to any grid by the
model itself. ``tiny-dinov2`` is the same architecture at toy width, seeded random weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DitfError
from .hub import looks_local, refuse_pickled
from .hub import offline as _offline
from . import register
from .base import (
    BlockFeatures,
    BlockTap,
    Conditioning,
    DiTAdapter,
    LatentPosterior,
    ModelSpec,
    Modulation,
    PromptEmbedding,
)

#: ImageNet statistics, as in their extractor's ``transforms.Normalize``
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Adapter(DiTAdapter):
    """A ViT without noise, text or AdaLN behind the adapter interface."""

    patch_stride = 14
    has_adaln = False
    stochastic = False
    conditioned = False

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._model = None

    # ---- weights ----------------------------------------------------------------------------
    def build_tiny(self):
        from transformers import Dinov2Config, Dinov2Model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.options.get("seed", 0))
            return Dinov2Model(Dinov2Config(**self.spec.options["tiny_config"]))

    @property
    def model(self):
        if self._model is None:
            from transformers import Dinov2Model

            if self.source is None:
                model = self.build_tiny()
            else:
                path = Path(self.source)
                if looks_local(self.source):
                    if not (path / "config.json").is_file():
                        raise DitfError(f"--weights {self.source}: not a transformers model folder (no config.json)")
                    refuse_pickled(path)
                from . import quiet_libraries

                try:
                    with quiet_libraries():
                        model = Dinov2Model.from_pretrained(
                            self.source, revision=self.revision, dtype=self.dtype, local_files_only=_offline(),
                            use_safetensors=True,  # never pickle
                        )
                except (OSError, ValueError) as exc:
                    hint = " (offline: HF_HUB_OFFLINE is set)" if _offline() else ""
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise DitfError(f"cannot load {self.spec.name} from {self.source}{hint}: {first}") from exc
            self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self._model

    def save_model(self, directory: str | Path) -> Path:
        """Write the model as a transformers folder (used to test `--weights DIR`)."""
        self.model.save_pretrained(str(directory))
        return Path(directory)

    # ---- the interface ----------------------------------------------------------------------
    def block_kind(self, block_index: int) -> str:
        return "vit"

    def normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[-1, 1] -> ImageNet mean/std normalisation: (x / 255 - mean) / std."""
        unit = pixels * np.float32(0.5) + np.float32(0.5)
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((unit - mean) / std, dtype=np.float32)

    def input_config(self) -> dict:
        return {
            "resize": f"long side to img_size, sides rounded to multiples of {self.patch_stride}, aspect kept",
            "pixels": "ImageNet mean/std",
            "facet": "token (block output, patch tokens, before the final LayerNorm)",
        }

    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        return [{} for _ in prompts]  # no text conditioning

    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        # the ViT takes the pixels themselves: a deterministic "posterior"
        return LatentPosterior(mean=pixels.to(device=self.device, dtype=self.dtype), std=None, dtype=self.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        return latents  # no diffusion: t is ignored (stored as t0)

    def forward_intermediates(
        self,
        noisy_latents: torch.Tensor,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        stop_early: bool = True,
    ) -> dict[int, BlockFeatures]:
        indices = self.check_indices(indices)
        model = self.model
        pixels = noisy_latents.to(self.device, model.dtype)
        batch, _, height, width = pixels.shape
        grid_h, grid_w = height // self.patch_stride, width // self.patch_stride

        def patch_tokens(args, kwargs, output) -> torch.Tensor:
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            return tokens[:, 1:].reshape(batch, grid_h, grid_w, -1)  # drop CLS (DINOv2 has no register tokens)

        taps = {k: BlockTap(model.encoder.layer[k], "post", patch_tokens) for k in indices}
        return self.capture(taps, lambda: model(pixel_values=pixels), stop_early)

    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        self.check_indices(indices)
        raise DitfError(f"{self.spec.name} has no AdaLN modulation (a ViT without timestep or text conditioning)")


_HUB = {"s14": "facebook/dinov2-small", "b14": "facebook/dinov2-base", "l14": "facebook/dinov2-large", "g14": "facebook/dinov2-giant"}
#: (blocks, width) of ViT-S/B/L/G-14; the default block is the last one, as in sd-dino / GeoAware-SC
_SIZES = {"s14": (12, 384), "b14": (12, 768), "l14": (24, 1024), "g14": (40, 1536)}

for _size, (_blocks, _width) in _SIZES.items():
    register(
        ModelSpec(
            name=f"dinov2-{_size}", family="dinov2", hub_id=_HUB[_size], num_blocks=_blocks, hidden_size=_width,
            default_k=_blocks - 1, default_t=0, img_size=840, license="Apache-2.0",
            description=f"DINOv2 ViT-{_size[0].upper()}/14 (baseline / fusion partner); token facet of block "
                        f"{_blocks - 1}, patch 14, ImageNet mean/std, t is unused (0)",
        ),
        Dinov2Adapter,
    )

_TINY_DINOV2 = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    mlp_ratio=2,
    patch_size=14,
    image_size=56,  # a 4 x 4 position table, interpolated to every grid like the real 37 x 37 one
    layerscale_value=1.0,
)

register(
    ModelSpec(
        name="tiny-dinov2", family="dinov2", hub_id=None, num_blocks=4, hidden_size=32, default_k=3, default_t=0,
        img_size=112, tiny=True, license="MIT (ditf's; random weights)",
        description="DINOv2 architecture at toy size (4 blocks, d=32, patch 14), seeded random weights",
        options={"tiny_config": _TINY_DINOV2, "seed": 0},
    ),
    Dinov2Adapter,
)
