"""PixArt-alpha (PixArt-XL-2-1024-MS) and its toy twin `tiny-pixart`.

Every block is a `BasicTransformerBlock` with `norm_type="ada_norm_single"`: it owns no AdaLN
linear. The model-level `adaln_single` regresses one (B, 6D) vector from t (and, for the
1024-px model, the image resolution and aspect ratio), passes it to every block as the
`timestep` keyword, and each block adds its learned `scale_shift_table` (6, D):

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        = (block.scale_shift_table[None] + timestep.reshape(B, 6, D)).chunk(6, dim=1)

each (B, 1, D). The block runs self-attention (modulated by the msa triple), then
cross-attention on the *un-normalised* stream (PixArt skips norm2 there), then
`norm2(hidden) * (1 + scale_mlp) + shift_mlp` into `ff`. So:

* z = input of `block.norm2` (image tokens after self- and cross-attention; norm2 runs once);
* shift, scale, gate = items 3, 4, 5 of that sum, computed in the model dtype as the block does.

The AdaLN sees t only (the caption enters through cross-attention), so the "t" ablation is
"tc" and "c" has no meaning. Noise: the DDPM training schedule (linear betas 1e-4..0.02, 1000
steps), `add_noise` at integer t; the transformer takes integer timesteps. Latents: the SD VAE,
4 channels, times 0.18215. Text: T5 only; the attention mask is kept (as float) because the
DiT's cross-attention uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from . import register
from ._diffusers import DiffusersAdapter
from ._tiny_text import tiny_t5, tiny_t5_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts
from .flux import tiny_vae

#: PixArt-alpha's training noise schedule (IDDPM, linear betas); the pipeline's DPM-Solver
#: scheduler carries the same betas but is a sampler, so the noising uses DDPM's add_noise
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _mlp_modulation(block, t6: torch.Tensor) -> Modulation:
    """shift_mlp, scale_mlp, gate_mlp of one block from the `adaln_single` output (B, 6D).

    The sum runs in the model dtype exactly as `BasicTransformerBlock.forward` does it; only
    the result is cast to float32.
    """
    # .to: with offload the block's table may still be in host memory (a no-op otherwise)
    chunks = (block.scale_shift_table[None].to(t6.device) + t6.reshape(t6.shape[0], 6, -1)).chunk(6, dim=1)
    return Modulation(*(chunks[i].squeeze(1).float() for i in (3, 4, 5)))


class PixArtAdapter(DiffusersAdapter):
    pipeline_cls = PixArtAlphaPipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("transformer_blocks", "num_layers", "pixart"),)
    separates_conditioning = False

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._noise_scheduler = DDPMScheduler(**_SCHEDULE)

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": PixArtTransformer2DModel(**config),
            "vae": tiny_vae(4, scaling_factor=0.18215),
            "text_encoder": tiny_t5(config["caption_channels"]),
            "tokenizer": tiny_t5_tokenizer(),
            "scheduler": DPMSolverMultistepScheduler(**_SCHEDULE),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": PixArtTransformer2DModel, "vae": AutoencoderKL}

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, mask, _, _ = pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=False, device=self.text_device, clean_caption=False,
                    max_sequence_length=self.spec.options.get("max_sequence_length", 120),
                )
                # float so that it survives `stack_prompt` and the store; 1 = keep, 0 = padding
                out.append({"prompt_embeds": embeds[0].float().cpu(), "prompt_attention_mask": mask[0].float().cpu()})
        return out

    # ---- noise ------------------------------------------------------------------------------
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        t = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=latents.device)
        return self._noise_scheduler.add_noise(latents, noise, t)

    # ---- the DiT ----------------------------------------------------------------------------
    def _size_conditions(self, batch: int, image_size: tuple[int, int]) -> dict | None:
        """resolution (H, W) and aspect ratio H / W in pixels, as PixArtAlphaPipeline passes them.

        Only the 1024-px model (sample_size 128) is trained with these micro-conditions; they
        enter `adaln_single`, so they are part of the modulation.
        """
        transformer = self.transformer
        if not transformer.use_additional_conditions:
            return None
        height, width = image_size
        dtype, device = transformer.dtype, self.device
        # filled on the device (a host tensor copied per forward would make the host wait for the
        # GPU), with the casts of `torch.tensor(...).to(dtype)`: int64 and float32 first
        resolution = torch.empty((batch, 2), dtype=torch.long, device=device)
        resolution[:, 0], resolution[:, 1] = height, width
        return {
            "resolution": resolution.to(dtype),
            "aspect_ratio": torch.full((batch, 1), float(height / width), dtype=torch.float32, device=device).to(dtype),
        }

    def _pixels(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        vae_factor = self.patch_stride // self.transformer.config.patch_size
        return latent_hw[0] * vae_factor, latent_hw[1] * vae_factor

    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch, _, height, width = noisy_latents.shape
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        cond = self.stack_prompt(prompt, batch, device, dtype)
        return {
            "hidden_states": noisy_latents.to(device, dtype),
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_attention_mask": cond.get("prompt_attention_mask"),
            "timestep": torch.full((batch,), int(timestep), dtype=torch.long, device=device),
            "added_cond_kwargs": self._size_conditions(batch, self._pixels((height, width))),
            "return_dict": False,
        }

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
        patch = self.transformer.config.patch_size
        grid_h, grid_w = noisy_latents.shape[2] // patch, noisy_latents.shape[3] // patch
        transformer = self.transformer
        taps = {}
        for k in indices:
            block = transformer.transformer_blocks[k]
            # the block receives adaln_single's output as `timestep`; with ada_norm_single, norm2
            # is called once per block, on the stream feeding ff
            taps[k] = BlockTap(
                block.norm2, "pre", lambda args, kwargs, out: args[0].reshape(args[0].shape[0], grid_h, grid_w, -1),
                block, "pre", lambda args, kwargs, out, block=block: _mlp_modulation(block, kwargs["timestep"]),
            )
        return self.capture(taps, lambda: transformer(**inputs), stop_early)

    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        """As the base class; `prompt` is unused (PixArt's AdaLN never sees the caption).

        For the size-conditioned 1024-px model, `image_size` (H, W in pixels, default the spec's
        square `img_size`) is the micro-condition the forward derives from the latents.
        """
        indices = self.check_indices(indices)
        self.refuse_conditioning_c(conditioning, 'whose AdaLN is conditioned on the timestep only (the caption enters through cross-attention)')
        transformer = self.transformer
        size = image_size or (self.spec.img_size, self.spec.img_size)
        t = torch.full((1,), int(timestep), dtype=torch.long, device=self.device)
        with torch.no_grad():
            t6, _ = transformer.adaln_single(
                t, self._size_conditions(1, size), batch_size=1, hidden_dtype=transformer.dtype
            )
            out = {}
            for k in indices:
                m = _mlp_modulation(transformer.transformer_blocks[k], t6)
                out[k] = Modulation(m.shift[0], m.scale[0], m.gate[0])
        return out


_TINY_PIXART = dict(
    num_attention_heads=2,
    attention_head_dim=24,  # d = 48: divisible by 3, so the size micro-conditions also fit
    in_channels=4,
    out_channels=8,  # learned sigma, as the real model
    num_layers=4,
    cross_attention_dim=48,
    sample_size=16,  # not 128: no resolution / aspect-ratio micro-conditions
    patch_size=2,
    caption_channels=32,  # T5 width
    use_additional_conditions=False,
)

register(
    ModelSpec(
        name="pixart-alpha", family="pixart", hub_id="PixArt-alpha/PixArt-XL-2-1024-MS", num_blocks=28,
        hidden_size=1152, default_k=14, default_t=141, img_size=960,
        description="PixArt-alpha XL-2 1024-MS; 28 blocks, d=1152, AdaLN on t only; paper defaults k=14, t=141",
        options={"max_sequence_length": 120}, license="CreativeML Open RAIL++-M",
    ),
    PixArtAdapter,
)
register(
    ModelSpec(
        name="tiny-pixart", family="pixart", hub_id=None, num_blocks=4, hidden_size=48, default_k=2, default_t=141,
        img_size=128, tiny=True, license="MIT (ditf's; random weights)",
        description="PixArt-alpha architecture at toy size (4 blocks, d=48), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_PIXART, "seed": 0},
    ),
    PixArtAdapter,
)
