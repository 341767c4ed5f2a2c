"""Sana (Sana 1600M 1024px) and its toy twin `tiny-sana`.

Every block is a `SanaTransformerBlock`: linear self-attention, cross-attention to the Gemma-2
caption, and a GLUMBConv MLP. Like PixArt it has AdaLN-single: the model-level `time_embed`
(`AdaLayerNormSingle`) regresses one (B, 6D) vector from t, passed to every block as its
`timestep` argument (positional, 5th), and each block adds its `scale_shift_table` (6, D):
shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp. The MLP side normalises the
stream after self- and cross-attention with `norm2`, so:

* z = input of `transformer_blocks[k].norm2` (image tokens, row-major on the latent grid);
* shift, scale, gate = items 3, 4, 5 of `scale_shift_table[None] + timestep.reshape(B, 6, D)`.

The AdaLN sees t only (the caption enters through cross-attention): `adaln-t` equals `adaln`
and `adaln-c` is refused. Noise: flow matching, x_t = s * noise + (1 - s) * x0 with s = t / 1000;
the transformer takes t (0..1000) times its config's `timestep_scale`, as `SanaPipeline` passes
it. Latents: the deep-compression autoencoder (`AutoencoderDC`, factor 32, deterministic
encoder) times its scaling factor; with patch size 1 a token is 32 x 32 pixels. Prompts: the
caption alone (the pipeline's optional "complex human instruction" prefix is not used).

Defaults: `rule_defaults` (k = 10 of 20, t = 260), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

from ..core.errors import DitfError
from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise
from ._tiny_text import tiny_gemma2, tiny_gemma_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, LatentPosterior, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults
from .pixart import _mlp_modulation


def _block_timestep(args, kwargs) -> torch.Tensor:
    """The AdaLN-single vector a `SanaTransformerBlock` receives (5th positional argument)."""
    return kwargs["timestep"] if "timestep" in kwargs else args[4]


class SanaAdapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = SanaPipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("transformer_blocks", "num_layers", "sana"),)
    separates_conditioning = False
    #: DC-AE factor 32 x patch 1
    patch_stride = 32

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": SanaTransformer2DModel(**config),
            "vae": AutoencoderDC(
                in_channels=3, latent_channels=config["in_channels"], attention_head_dim=8,
                encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                encoder_block_out_channels=(8,) * 6, decoder_block_out_channels=(8,) * 6,
                encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
                encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
            ),
            "text_encoder": tiny_gemma2(config["caption_channels"]),
            "tokenizer": tiny_gemma_tokenizer(),
            "scheduler": DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": SanaTransformer2DModel, "vae": AutoencoderDC}

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, mask, _, _ = pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=False, device=self.text_device, clean_caption=False,
                    max_sequence_length=self.spec.options.get("max_sequence_length", 300),
                    complex_human_instruction=None,
                )
                out.append({"prompt_embeds": embeds[0].float().cpu(), "prompt_attention_mask": mask[0].float().cpu()})
        return out

    # ---- images -----------------------------------------------------------------------------
    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        """DC-AE's encoder is deterministic: the posterior is a point (no std)."""
        vae = self.vae
        with torch.no_grad():
            latent = vae.encode(pixels.to(device=self.device, dtype=vae.dtype)).latent
        return LatentPosterior(mean=latent, std=None, dtype=self.dtype, scale=float(vae.config.scaling_factor))

    # ---- the DiT ----------------------------------------------------------------------------
    def _timestep(self, batch: int, timestep: int) -> torch.Tensor:
        scale = float(self.transformer.config.timestep_scale)
        return torch.full((batch,), float(timestep), device=self.device) * scale

    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        transformer = self.transformer
        if transformer.config.guidance_embeds:
            raise DitfError(f"{self.spec.name}: guidance-distilled Sana (Sana-Sprint) is not supported")
        batch = noisy_latents.shape[0]
        cond = self.stack_prompt(prompt, batch, self.device, transformer.dtype)
        return {
            "hidden_states": noisy_latents.to(self.device, transformer.dtype),
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_attention_mask": cond.get("prompt_attention_mask"),
            "timestep": self._timestep(batch, timestep),
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
            taps[k] = BlockTap(
                block.norm2, "pre", lambda args, kwargs, out: args[0].reshape(args[0].shape[0], grid_h, grid_w, -1),
                block, "pre",
                lambda args, kwargs, out, block=block: _mlp_modulation(block, _block_timestep(args, kwargs)),
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
        """As the base class; `prompt` is unused (Sana's AdaLN never sees the caption)."""
        indices = self.check_indices(indices)
        self.refuse_conditioning_c(conditioning, 'whose AdaLN is conditioned on the timestep only (the caption enters through cross-attention)')
        transformer = self.transformer
        with torch.no_grad():
            t6, _ = transformer.time_embed(self._timestep(1, timestep), batch_size=1, hidden_dtype=transformer.dtype)
            out = {}
            for k in indices:
                m = _mlp_modulation(transformer.transformer_blocks[k], t6)
                out[k] = Modulation(m.shift[0], m.scale[0], m.gate[0])
        return out


_TINY_SANA = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=4,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=32,  # Gemma-2 width
    mlp_ratio=2.5,
    sample_size=8,
    patch_size=1,
)

_K, _T, _RULE = rule_defaults(20, "flow")

register(
    ModelSpec(
        name="sana", family="sana", hub_id="Efficient-Large-Model/Sana_1600M_1024px_diffusers", num_blocks=20,
        hidden_size=2240, default_k=_K, default_t=_T, img_size=1024, defaults_rule=_RULE,
        description="Sana 1600M 1024px; 20 blocks (linear attention, GLUMBConv), d=2240, AdaLN-single on t only, DC-AE f32",
        options={"max_sequence_length": 300},
        license="NVIDIA Sana licence ('other' on the hub, non-commercial; read the model card)",
    ),
    SanaAdapter,
)
register(
    ModelSpec(
        name="tiny-sana", family="sana", hub_id=None, num_blocks=4, hidden_size=32, default_k=2, default_t=_T,
        img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Sana at toy size (4 blocks, d=32, DC-AE f32), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_SANA, "seed": 0},
    ),
    SanaAdapter,
)
