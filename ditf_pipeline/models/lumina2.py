"""Lumina-Image 2.0 and its toy twin `tiny-lumina2`.

`Lumina2Transformer2DModel`: a single-stream DiT of 26 `Lumina2TransformerBlock`s (`layers`,
width 2304) over the joint sequence [caption; image], preceded by refiner blocks run on each
stream alone: `context_refiner` (caption, unmodulated) and `noise_refiner` (image, modulated).
Only `layers` are numbered as blocks k; the refiners always run.

A modulated block normalises with RMSNorms that carry a learned weight, and its modulation
(`norm1`, a `LuminaRMSNormZero`: SiLU + Linear, D -> 4D, from the timestep embedding) gives
scale_msa, gate_msa, scale_mlp, gate_mlp: scales and gates, no shift. The MLP side is
``feed_forward(ffn_norm1(x) * (1 + scale_mlp))``, then ``x + tanh(gate_mlp) * ffn_norm2(...)``. So,
as the paper's appendix C for two-norm blocks:

* z = input of `layers[k].ffn_norm1` (the stream after attention), image tokens of the joint
  sequence (they follow each sample's unpadded caption);
* scale, gate = items 2 and 3 of what `layers[k].norm1` returns (the gate as regressed: the
  block applies tanh to it); norm_weight = `layers[k].ffn_norm1.weight`; no shift (absent).

The variants apply ``rmsnorm(z) * norm_weight * (1 + scale)`` (`match.features`, key config
``"norm": "rms"``). The modulation sees the timestep only (`time_caption_embed` returns the
caption's projection separately): `adaln-t` equals `adaln` and `adaln-c` is refused. Noise: flow
matching, x_t = s * noise + (1 - s) * x0, s = t / 1000; the transformer takes 1 - s (Lumina's time
runs from noise at 0 to image at 1, as `Lumina2Pipeline` passes it). Latents: the Flux VAE (16
channels, shift and scale factors), patch 2: a token is 16 x 16 pixels. Prompts: the pipeline's
system prompt and template, Gemma-2's second-to-last hidden state, padded with a zero mask.

Defaults: `rule_defaults` (k = 13 of 26, t = 260), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from diffusers import AutoencoderKL

from ..core.errors import DitfError
from ..adaln import RMS_EPS
from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise
from ._tiny_text import tiny_gemma2, tiny_gemma_tokenizer
from .base import (
    BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults,
)
from .flux import tiny_vae


def check_rms_eps(name: str, config: dict) -> None:
    """The match stage applies the MLP-side RMSNorm with `RMS_EPS`; another eps would give other features."""
    eps = float(config.get("norm_eps", RMS_EPS))
    if eps != RMS_EPS:
        raise DitfError(f"{name}: the transformer's norm_eps is {eps}; ditf's RMSNorm variants assume {RMS_EPS}")


def jitter_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Draw every RMSNorm weight from U(0.5, 1.5) (seeded by the caller): initialised to ones they
    would make the stored `norm_weight` a no-op the toy twin could not tell apart from its absence."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "RMSNorm" and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
    return model


class Lumina2Adapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = Lumina2Pipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("layers", "num_layers", "joint"),)
    separates_conditioning = False
    modulated_norm = "rms"
    width_entries = ("hidden_size",)  # Lumina's config names its width `hidden_size` (no `attention_head_dim`)

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": jitter_norm_weights(Lumina2Transformer2DModel(**config)),
            "vae": tiny_vae(config["in_channels"], scaling_factor=0.3611, shift_factor=0.1159),
            "text_encoder": tiny_gemma2(config["cap_feat_dim"]),
            "tokenizer": tiny_gemma_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": Lumina2Transformer2DModel, "vae": AutoencoderKL}

    def check_config(self, config: dict) -> None:
        check_rms_eps(self.spec.name, config)

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        length = self.spec.options.get("max_sequence_length", 256)
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, mask, _, _ = pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=False, device=self.text_device, max_sequence_length=length,
                )
                out.append({"prompt_embeds": embeds[0].float().cpu(), "prompt_attention_mask": mask[0].float().cpu()})
        return out

    # ---- the DiT ----------------------------------------------------------------------------
    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch = noisy_latents.shape[0]
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        cond = self.stack_prompt(prompt, batch, device, dtype)
        return {
            "hidden_states": noisy_latents.to(device, dtype),
            "timestep": torch.full((batch,), 1.0 - timestep / 1000.0, device=device),
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_attention_mask": cond["prompt_attention_mask"] > 0.5,
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
        starts = inputs["encoder_attention_mask"].sum(dim=1).tolist()  # image tokens follow each caption
        transformer = self.transformer

        def image_tokens(args, kwargs, out):
            x = args[0]
            rows = [x[i, int(s): int(s) + grid_h * grid_w] for i, s in enumerate(starts)]
            return torch.stack(rows).reshape(x.shape[0], grid_h, grid_w, -1)

        def mlp_modulation(block):
            def read(args, kwargs, out):
                weight = block.ffn_norm1.weight.float()
                return Modulation(None, out[2].float(), out[3].float(), weight.expand(out[2].shape[0], -1))
            return read

        taps = {}
        for k in indices:
            block = transformer.layers[k]
            taps[k] = BlockTap(block.ffn_norm1, "pre", image_tokens, block.norm1, "post", mlp_modulation(block))
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
        self.refuse_conditioning_c(conditioning, 'whose modulation is regressed from the timestep only (the caption enters through joint attention)')
        transformer = self.transformer
        embed = transformer.time_caption_embed
        t = torch.full((1,), 1.0 - timestep / 1000.0, device=self.device)
        with torch.no_grad():
            temb = embed.timestep_embedder(embed.time_proj(t).to(transformer.dtype))
            out = {}
            for k in indices:
                block = transformer.layers[k]
                chunks = block.norm1.linear(block.norm1.silu(temb)).float().chunk(4, dim=1)
                out[k] = Modulation(None, chunks[2][0], chunks[3][0], block.ffn_norm1.weight.float())
        return out


_TINY_LUMINA2 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    hidden_size=32,
    num_layers=4,
    num_refiner_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    axes_dim_rope=(4, 6, 6),  # sums to the head size
    axes_lens=(300, 64, 64),
    cap_feat_dim=32,  # Gemma-2 width
)

_K, _T, _RULE = rule_defaults(26, "flow")

register(
    ModelSpec(
        name="lumina2", family="lumina2", hub_id="Alpha-VLLM/Lumina-Image-2.0", num_blocks=26, hidden_size=2304,
        default_k=_K, default_t=_T, img_size=1024, defaults_rule=_RULE,
        description="Lumina-Image 2.0; 26 joint blocks (+ refiners), d=2304, scale-only RMSNorm modulation from t only",
        options={"max_sequence_length": 256}, license="Apache-2.0",
    ),
    Lumina2Adapter,
)
register(
    ModelSpec(
        name="tiny-lumina2", family="lumina2", hub_id=None, num_blocks=4, hidden_size=32, default_k=2,
        default_t=_T, img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Lumina-Image 2.0 at toy size (4 blocks, d=32, Gemma-2 and VAE at toy size), seeded random weights",
        options={"max_sequence_length": 256, "tiny_config": _TINY_LUMINA2, "seed": 0},
    ),
    Lumina2Adapter,
)
