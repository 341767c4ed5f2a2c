"""Flux (FLUX.1-dev, FLUX.1-schnell) and its toy twin `tiny-flux`.

Block numbering follows the paper: 0..18 are the double-stream blocks, 19..56 the
single-stream blocks (`single_transformer_blocks[k - 19]`).

* double block k: z = input of `block.norm2` (the image stream after attention); shift, scale,
  gate = items 3, 4, 5 of the 6-way split of `block.norm1.linear` (the MLP-side modulation
  that, with norm2, feeds `block.ff`).
* single block k: z = input of `block.norm` restricted to the image tokens (the block sees
  [text; image]); shift, scale, gate = the 3-way split of `block.norm.linear`.

Noise: rectified flow, x_t = s * noise + (1 - s) * x0 with s = t / 1000; the transformer takes
s (it multiplies by 1000 inside), and FLUX.1-dev also takes `guidance` (3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise, chunk_modulation, time_text_parts
from ._tiny_text import tiny_clip, tiny_clip_tokenizer, tiny_t5, tiny_t5_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts


def tiny_vae(latent_channels: int, **config) -> AutoencoderKL:
    """A 4-level (factor 8) VAE a few kilobytes large, same code path as the real one."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


class FluxAdapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = FluxPipeline
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    block_lists = (("transformer_blocks", "num_layers", "double"), ("single_transformer_blocks", "num_single_layers", "single"))

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._image_ids_cache: dict[tuple, torch.Tensor] = {}

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": FluxTransformer2DModel(**config),
            "vae": tiny_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": tiny_clip(projection_dim=config["pooled_projection_dim"], hidden_size=config["pooled_projection_dim"]),
            "tokenizer": tiny_clip_tokenizer(),
            "text_encoder_2": tiny_t5(config["joint_attention_dim"]),
            "tokenizer_2": tiny_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL}

    @property
    def num_double(self) -> int:
        """Double-stream blocks of the loaded checkpoint (19 in FLUX.1): block k >= this is single."""
        return self.architecture.blocks[0][1]

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, pooled, _ = pipe.encode_prompt(
                    prompt, prompt_2=None, device=self.text_device,
                    max_sequence_length=self.spec.options.get("max_sequence_length", 512),
                )
                out.append({"prompt_embeds": embeds[0].float().cpu(), "pooled_prompt_embeds": pooled[0].float().cpu()})
        return out

    # ---- the DiT ----------------------------------------------------------------------------
    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch, channels, height, width = noisy_latents.shape
        grid_h, grid_w = height // 2, width // 2
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        hidden = FluxPipeline._pack_latents(noisy_latents.to(device, dtype), batch, channels, height, width)
        image_ids = self._image_ids(grid_h, grid_w, device, dtype)
        cond = self.stack_prompt(prompt, batch, device, dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        inputs = {
            "hidden_states": hidden,
            "encoder_hidden_states": cond["prompt_embeds"],
            "pooled_projections": cond["pooled_prompt_embeds"],
            "timestep": torch.full((batch,), timestep / 1000.0, device=device),
            "img_ids": image_ids,
            "txt_ids": text_ids,
            "return_dict": False,
        }
        if transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), self.spec.guidance or 3.5, device=device)
        return inputs

    def _image_ids(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        """The image tokens' position ids, made once per grid: diffusers builds them on the host,
        and copying them to the device on every forward would make the host wait for the GPU."""
        key = (grid_h, grid_w, str(device), dtype)
        if key not in self._image_ids_cache:
            self._image_ids_cache[key] = FluxPipeline._prepare_latent_image_ids(1, grid_h, grid_w, device, dtype)
        return self._image_ids_cache[key]

    def forward_intermediates(
        self,
        noisy_latents: torch.Tensor,
        prompt: Prompts,
        timestep: int,
        indices: Sequence[int],
        stop_early: bool = True,
    ) -> dict[int, BlockFeatures]:
        indices = self.check_indices(indices)
        inputs = self._inputs(noisy_latents, prompt, timestep)
        grid_h, grid_w = noisy_latents.shape[2] // 2, noisy_latents.shape[3] // 2
        n_text = inputs["encoder_hidden_states"].shape[1]
        transformer = self.transformer

        def grid(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(z.shape[0], grid_h, grid_w, z.shape[-1])

        taps = {}
        for k in indices:
            norm, parts, take = self._adaln(k)

            def read_modulation(args, kwargs, out, parts=parts, take=take) -> Modulation:
                return Modulation(*chunk_modulation(out, parts, take))

            if self.block_kind(k) == "double":
                # norm2 runs after norm1.linear, on the image stream after attention
                feature = (transformer.transformer_blocks[k].norm2, "pre", lambda args, kwargs, out: grid(args[0]))
            else:
                # the single block's norm sees [text; image] and runs its linear inside
                feature = (norm, "post", lambda args, kwargs, out: grid(args[0][:, n_text:]))
            taps[k] = BlockTap(*feature, norm.linear, "post", read_modulation)
        return self.capture(taps, lambda: transformer(**inputs), stop_early)

    def _adaln(self, k: int) -> tuple[torch.nn.Module, int, tuple[int, int, int]]:
        """Block k's AdaLN module, the split of its linear, and which chunks are (shift, scale, gate).

        Double blocks: the MLP-side items 3, 4, 5 of norm1's 6-way split; single blocks: the
        only modulation, items 0, 1, 2 of the 3-way split.
        """
        transformer = self.transformer
        if self.block_kind(k) == "double":
            return transformer.transformer_blocks[k].norm1, 6, (3, 4, 5)
        return transformer.single_transformer_blocks[k - self.num_double].norm, 3, (0, 1, 2)

    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        indices = self.check_indices(indices)
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        pooled = prompt["pooled_prompt_embeds"].to(device, dtype)[None]
        # the same rounding the forward applies: timestep cast to the model dtype, then x1000
        t = (torch.full((1,), timestep / 1000.0, device=device).to(dtype) * 1000)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((1,), self.spec.guidance or 3.5, device=device).to(dtype) * 1000
        with torch.no_grad():
            t_part, c_part = time_text_parts(transformer.time_text_embed, t, pooled, guidance)
            temb = {"tc": t_part + c_part, "t": t_part, "c": c_part}[conditioning]
            out = {}
            for k in indices:
                norm, parts, take = self._adaln(k)
                out[k] = Modulation(*(v[0] for v in chunk_modulation(norm.linear(norm.silu(temb)), parts, take)))
        return out


_TINY_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

register(
    ModelSpec(
        name="flux", family="flux", hub_id="black-forest-labs/FLUX.1-dev", num_blocks=57, hidden_size=3072,
        default_k=28, default_t=260, img_size=640, guidance=3.5,
        description="FLUX.1-dev; 19 double + 38 single blocks; paper default k=28 (single block 9), t=260",
        options={"max_sequence_length": 512}, license="FLUX.1 [dev] Non-Commercial License (gated)",
    ),
    FluxAdapter,
)
register(
    ModelSpec(
        name="flux-schnell", family="flux", hub_id="black-forest-labs/FLUX.1-schnell", num_blocks=57,
        hidden_size=3072, default_k=28, default_t=260, img_size=640,
        description="FLUX.1-schnell (no guidance embedding); Flux defaults",
        options={"max_sequence_length": 256}, license="Apache-2.0",
    ),
    FluxAdapter,
)
register(
    ModelSpec(
        name="tiny-flux", family="flux", hub_id=None, num_blocks=4, hidden_size=32, default_k=2, default_t=260,
        img_size=128, guidance=3.5, tiny=True, license="MIT (ditf's; random weights)",
        description="Flux architecture at toy size (2 double + 2 single blocks, d=32), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_FLUX, "seed": 0},
    ),
    FluxAdapter,
)
