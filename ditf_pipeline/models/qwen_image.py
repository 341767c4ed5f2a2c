"""Qwen-Image and its toy twin `tiny-qwen-image`.

`QwenImageTransformer2DModel`: 60 double-stream MMDiT blocks (`QwenImageTransformerBlock`,
width 3072). Each block owns its modulation per stream: `img_mod` (SiLU + Linear, D -> 6D) for
the image stream, `txt_mod` for the text stream, both from the model-level `time_text_embed`
of the timestep alone. `img_mod`'s output splits 6 ways into shift, scale, gate of `img_norm1`
(attention side) and of `img_norm2` (MLP side). As the paper's appendix C for two-norm blocks:

* z = input of `transformer_blocks[k].img_norm2` (the image stream after attention);
* shift, scale, gate = items 3, 4, 5 of `transformer_blocks[k].img_mod`'s output split 6 ways.

The text never enters the modulation (it acts through joint attention): `adaln-t` equals
`adaln` and `adaln-c` is refused. Edit checkpoints (`zero_cond_t`, `use_additional_t_cond`) are
refused. Noise: flow matching, x_t = s * noise + (1 - s) * x0, s = t / 1000 (the transformer takes
s). Latents: `AutoencoderKLQwenImage` (a video VAE run on one frame), normalised per channel
with its `latents_mean` / `latents_std`, packed 2 x 2 as the pipeline does; a token is 16 x 16
pixels. Text: Qwen2.5-VL's last hidden state of the pipeline's prompt template (its system
prefix dropped), padded with a zero mask to `max_sequence_length` tokens so prompts batch.

Defaults: `rule_defaults` (k = 30 of 60, t = 260), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

from ..core.errors import DitfError
from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise, chunk_modulation
from ._tiny_text import tiny_qwen2_tokenizer, tiny_qwen25_vl
from .base import BlockFeatures, BlockTap, Conditioning, LatentPosterior, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults

#: shift, scale, gate of img_norm2 in img_mod's 6-way split
_MLP_CHUNKS = (3, 4, 5)


class QwenImageAdapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = QwenImagePipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("transformer_blocks", "num_layers", "double"),)
    separates_conditioning = False

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": QwenImageTransformer2DModel(**config),
            "vae": AutoencoderKLQwenImage(
                base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True],
                latents_mean=[round(0.1 * i - 0.8, 2) for i in range(16)], latents_std=[round(1.0 + 0.1 * i, 2) for i in range(16)],
            ),
            "text_encoder": tiny_qwen25_vl(config["joint_attention_dim"]),
            "tokenizer": tiny_qwen2_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage}

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        length = self.spec.options.get("max_sequence_length", 256)
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, _ = pipe.encode_prompt(prompt, device=self.text_device, max_sequence_length=length)
                embeds = embeds[0].float().cpu()
                mask = torch.zeros(length)
                mask[: embeds.shape[0]] = 1.0
                padded = torch.zeros(length, embeds.shape[1])
                padded[: embeds.shape[0]] = embeds
                out.append({"prompt_embeds": padded, "prompt_attention_mask": mask})
        return out

    # ---- images -----------------------------------------------------------------------------
    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        """One frame through the video VAE; the per-channel normalisation folded into mean and std
        ((mean + std * eps - m) / s = (mean - m) / s + (std / s) * eps)."""
        vae = self.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device=self.device, dtype=vae.dtype)[:, :, None]).latent_dist
        m = torch.tensor(vae.config.latents_mean, device=self.device, dtype=vae.dtype).view(1, -1, 1, 1)
        s = torch.tensor(vae.config.latents_std, device=self.device, dtype=vae.dtype).view(1, -1, 1, 1)
        return LatentPosterior(mean=(posterior.mean[:, :, 0] - m) / s, std=posterior.std[:, :, 0] / s, dtype=self.dtype)

    # ---- the DiT ----------------------------------------------------------------------------
    def _check_plain(self) -> None:
        config = self.transformer_config()
        if config.get("zero_cond_t") or config.get("use_additional_t_cond") or config.get("guidance_embeds"):
            raise DitfError(f"{self.spec.name}: Qwen-Image edit / guidance-distilled checkpoints are not supported")

    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        self._check_plain()
        batch, channels, height, width = noisy_latents.shape
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        cond = self.stack_prompt(prompt, batch, device, dtype)
        return {
            "hidden_states": QwenImagePipeline._pack_latents(noisy_latents.to(device, dtype), batch, channels, height, width),
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_hidden_states_mask": cond.get("prompt_attention_mask"),
            "timestep": torch.full((batch,), timestep / 1000.0, device=device),
            "img_shapes": [[(1, height // 2, width // 2)]] * batch,
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
        grid_h, grid_w = noisy_latents.shape[2] // 2, noisy_latents.shape[3] // 2
        transformer = self.transformer
        taps = {}
        for k in indices:
            block = transformer.transformer_blocks[k]
            taps[k] = BlockTap(
                block.img_norm2, "pre", lambda args, kwargs, out: args[0].reshape(args[0].shape[0], grid_h, grid_w, -1),
                block.img_mod, "post", lambda args, kwargs, out: Modulation(*chunk_modulation(out, 6, _MLP_CHUNKS)),
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
        """As the base class; `prompt` is unused (the modulation sees the timestep only)."""
        indices = self.check_indices(indices)
        self.refuse_conditioning_c(conditioning, 'whose modulation is regressed from the timestep only (the text enters through joint attention)')
        self._check_plain()
        transformer = self.transformer
        dtype = transformer.dtype
        t = torch.full((1,), timestep / 1000.0, device=self.device).to(dtype)  # as the forward casts it
        with torch.no_grad():
            temb = transformer.time_text_embed(t, torch.empty(0, dtype=dtype, device=self.device))
            out = {}
            for k in indices:
                chunks = chunk_modulation(transformer.transformer_blocks[k].img_mod(temb), 6, _MLP_CHUNKS)
                out[k] = Modulation(*(v[0] for v in chunks))
        return out


_TINY_QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # Qwen2.5-VL width
    axes_dims_rope=(4, 6, 6),
)

_K, _T, _RULE = rule_defaults(60, "flow")

register(
    ModelSpec(
        name="qwen-image", family="qwen-image", hub_id="Qwen/Qwen-Image", num_blocks=60, hidden_size=3072,
        default_k=_K, default_t=_T, img_size=960, defaults_rule=_RULE,
        description="Qwen-Image; 60 double-stream blocks, d=3072, per-block img_mod / txt_mod from t only",
        options={"max_sequence_length": 256}, license="Apache-2.0",
    ),
    QwenImageAdapter,
)
register(
    ModelSpec(
        name="tiny-qwen-image", family="qwen-image", hub_id=None, num_blocks=4, hidden_size=32, default_k=2,
        default_t=_T, img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Qwen-Image at toy size (4 blocks, d=32, Qwen2.5-VL and video VAE at toy size), seeded random weights",
        options={"max_sequence_length": 256, "tiny_config": _TINY_QWEN_IMAGE, "seed": 0},
    ),
    QwenImageAdapter,
)
