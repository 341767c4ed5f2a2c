"""Stable Diffusion 3 / 3.5 (MMDiT) and its toy twin `tiny-sd3`.

Every block is a `JointTransformerBlock` (two streams, two AdaLN groups), so every block is
captured the same way:

* z = input of `block.norm2`: the image stream after attention (after the second, image-only
  attention too in SD3.5's dual-attention blocks), i.e. the raw residual the MLP-side AdaLN
  normalises;
* shift, scale, gate = shift_mlp, scale_mlp, gate_mlp = items 3, 4, 5 of the split of
  `block.norm1.linear`. That linear is 6-way (`AdaLayerNormZero`: shift_msa, scale_msa,
  gate_msa, shift_mlp, scale_mlp, gate_mlp) or 9-way for SD3.5's dual-attention blocks
  (`SD35AdaLayerNormZeroX`: the same six, then shift_msa2, scale_msa2, gate_msa2), so items
  3, 4, 5 are the MLP modulation in both cases; the number of chunks is read off the linear.

The last block is `context_pre_only` (its text stream stops after attention and its text-side
norm is an AdaLayerNormContinuous), but its image stream, `norm1` and `norm2` are ordinary, so
nothing changes for DiTF. `qk_norm` only touches attention.

Noise: rectified flow, x_t = s * noise + (1 - s) * x0 with s = t / 1000; unlike Flux, the SD3
transformer takes the timestep itself (float, 0..1000). Latents: 16 channels,
(latent - shift_factor) * scaling_factor, fed as (B, 16, h, w); `pos_embed` patchifies 2x2 and
emits the image tokens row-major on the (h/2, w/2) grid. The conditioning is the pooled CLIP-L +
CLIP-G projection (c, through `time_text_embed.text_embedder`) plus the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from ..core.errors import DitfError
from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise, chunk_modulation, time_text_parts
from ._tiny_text import tiny_clip, tiny_clip_tokenizer, tiny_t5, tiny_t5_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts
from .flux import tiny_vae

#: shift_mlp, scale_mlp, gate_mlp in both AdaLayerNormZero (6-way) and SD35AdaLayerNormZeroX (9-way)
_MLP_CHUNKS = (3, 4, 5)


class SD3Adapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = StableDiffusion3Pipeline
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    block_lists = (("transformer_blocks", "num_layers", "joint"),)

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        # the pooled projection is [CLIP-L proj; CLIP-G proj]; the CLIP hidden states are
        # concatenated and zero-padded to the T5 width, which is joint_attention_dim
        clip_width = config["pooled_projection_dim"] // 2
        return {
            "transformer": SD3Transformer2DModel(**config),
            "vae": tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": tiny_clip(hidden_size=clip_width, projection_dim=clip_width, with_projection=True),
            "tokenizer": tiny_clip_tokenizer(),
            "text_encoder_2": tiny_clip(hidden_size=clip_width, projection_dim=clip_width, with_projection=True),
            "tokenizer_2": tiny_clip_tokenizer(),
            "text_encoder_3": tiny_t5(config["joint_attention_dim"]),
            "tokenizer_3": tiny_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL}

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt, prompt_2=None, prompt_3=None, device=self.text_device, do_classifier_free_guidance=False,
                    max_sequence_length=self.spec.options.get("max_sequence_length", 256),
                )
                out.append({"prompt_embeds": embeds[0].float().cpu(), "pooled_prompt_embeds": pooled[0].float().cpu()})
        return out

    # ---- the DiT ----------------------------------------------------------------------------
    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch, _, height, width = noisy_latents.shape
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        patch = transformer.config.patch_size
        max_grid = transformer.config.pos_embed_max_size
        if max_grid is not None and max(height, width) // patch > max_grid:
            px = max_grid * self.patch_stride
            raise DitfError(
                f"image too large for {self.spec.name}: its position embedding covers at most "
                f"{max_grid}x{max_grid} tokens ({px} px a side); got {height // patch}x{width // patch}"
            )
        cond = self.stack_prompt(prompt, batch, device, dtype)
        return {
            "hidden_states": noisy_latents.to(device, dtype),
            "encoder_hidden_states": cond["prompt_embeds"],
            "pooled_projections": cond["pooled_prompt_embeds"],
            # the pipeline passes the scheduler's float32 timesteps (0..1000) unrounded
            "timestep": torch.full((batch,), float(timestep), device=device),
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
            parts = self._norm1_parts(block)
            # norm2 runs after norm1 (and after both attentions), on the image stream only
            taps[k] = BlockTap(
                block.norm2, "pre", lambda args, kwargs, out: args[0].reshape(args[0].shape[0], grid_h, grid_w, -1),
                block.norm1.linear, "post",
                lambda args, kwargs, out, parts=parts: Modulation(*chunk_modulation(out, parts, _MLP_CHUNKS)),
            )
        return self.capture(taps, lambda: transformer(**inputs), stop_early)

    @staticmethod
    def _norm1_parts(block) -> int:
        """6 for AdaLayerNormZero, 9 for SD35AdaLayerNormZeroX (dual attention)."""
        return block.norm1.linear.out_features // block.norm2.normalized_shape[0]

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
        t = torch.full((1,), float(timestep), device=device)  # as in the forward: float32, not rounded
        with torch.no_grad():
            t_part, c_part = time_text_parts(transformer.time_text_embed, t, pooled)
            temb = {"tc": t_part + c_part, "t": t_part, "c": c_part}[conditioning]
            out = {}
            for k in indices:
                block = transformer.transformer_blocks[k]
                norm = block.norm1
                chunks = chunk_modulation(norm.linear(norm.silu(temb)), self._norm1_parts(block), _MLP_CHUNKS)
                out[k] = Modulation(*(v[0] for v in chunks))
        return out


_TINY_SD3 = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,  # T5 width; >= the concatenated CLIP widths (32 + 32)
    caption_projection_dim=32,  # = inner dim (2 x 16)
    pooled_projection_dim=64,  # CLIP-L proj (32) + CLIP-G proj (32)
    out_channels=16,
    pos_embed_max_size=32,  # token grids up to 32 x 32, i.e. images up to 512 px a side
    dual_attention_layers=(0, 1),  # the SD3.5-medium path (9-way norm1, attn2)
    qk_norm="rms_norm",  # as in SD3.5
)

register(
    ModelSpec(
        name="sd3", family="sd3", hub_id="stabilityai/stable-diffusion-3-medium-diffusers", num_blocks=24,
        hidden_size=1536, default_k=9, default_t=340, img_size=960,
        description="Stable Diffusion 3 medium; 24 joint blocks, d=1536; paper defaults k=9, t=340",
        options={"max_sequence_length": 256}, license="Stability AI Community License (gated)",
    ),
    SD3Adapter,
)
register(
    ModelSpec(
        name="sd3.5", family="sd3", hub_id="stabilityai/stable-diffusion-3.5-large", num_blocks=38,
        hidden_size=2432, default_k=23, default_t=380, img_size=960,
        description="Stable Diffusion 3.5 large; 38 joint blocks (qk RMSNorm), d=2432; paper defaults k=23, t=380",
        options={"max_sequence_length": 256}, license="Stability AI Community License (gated)",
    ),
    SD3Adapter,
)
register(
    ModelSpec(
        name="tiny-sd3", family="sd3", hub_id=None, num_blocks=4, hidden_size=32, default_k=2, default_t=340,
        img_size=128, tiny=True, license="MIT (ditf's; random weights)",
        description="SD3/SD3.5 architecture at toy size (4 joint blocks, 0-1 dual-attention, d=32), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_SD3, "seed": 0},
    ),
    SD3Adapter,
)
