"""Flux.2 (FLUX.2-dev) and its toy twin `tiny-flux2`.

`Flux2Transformer2DModel`: 8 double-stream then 48 single-stream blocks of width 6144 (paper
numbering as Flux: block k >= 8 is `single_transformer_blocks[k - 8]`). Modulation is *shared*:
no block owns an AdaLN linear. The model computes, once per forward, from the timestep (and
guidance) embedding `temb = time_guidance_embed(t, g)`:

* `double_stream_modulation_img(temb)` (B, 6D): the image stream's two (shift, scale, gate)
  sets, passed to every double block as `temb_mod_img`;
* `single_stream_modulation(temb)` (B, 3D): one set, passed to every single block as `temb_mod`.

Captured, as for Flux:

* double block k: z = input of `transformer_blocks[k].norm2` (image stream after attention);
  shift, scale, gate = the second set of `Flux2Modulation.split(temb_mod_img, 2)` (the MLP side);
* single block k: z = input of `single_transformer_blocks[k - 8].norm` on the image tokens (the
  block sees [text; image]); shift, scale, gate = `Flux2Modulation.split(temb_mod, 1)[0]`.

Storage of the shared modulation: every block's key holds the vectors that block applies, so
all double-block keys of one (image, t) hold the same vectors (and all single-block keys); each
key stays self-contained and every variant reads it as any other family's.

The text never enters the modulation (guidance is a sampling setting and stays with t):
`adaln-t` equals `adaln`, `adaln-c` is refused. Noise: rectified flow, the transformer takes
s = t / 1000. Latents: `AutoencoderKLFlux2` (32 channels, factor 8), patchified 2 x 2 to 128
channels and normalised with the VAE's batch-norm running statistics, as the pipeline does; a
token is 16 x 16 pixels.

Text: FLUX.2-dev encodes with Mistral-3 (`Flux2Pipeline`, hidden states of layers 10, 20, 30);
the toy twin uses FLUX.2 klein's pipeline (`Flux2KleinPipeline`: a Qwen3 chat prompt) because a
toy Mistral-3 processor cannot be built offline, so the FLUX.2-dev text path is not exercised
on the CPU.

Defaults: `rule_defaults` (k = 28 of 56, t = 260), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise
from ._tiny_text import tiny_qwen3, tiny_qwen3_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, LatentPosterior, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults


def _mlp_set(mod: torch.Tensor, sets: int) -> Modulation:
    """The (shift, scale, gate) a block's MLP side applies, from the shared modulation tensor:
    the last of its `sets` sets (double blocks: 2, single blocks: 1), as float32 (B, D)."""
    shift, scale, gate = Flux2Modulation.split(mod, sets)[-1]
    return Modulation(shift[:, 0].float(), scale[:, 0].float(), gate[:, 0].float())


class Flux2Adapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = Flux2Pipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("transformer_blocks", "num_layers", "double"), ("single_transformer_blocks", "num_single_layers", "single"))
    separates_conditioning = False

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=32, norm_num_groups=4, sample_size=64,
        )
        # running statistics as a trained VAE has them (not the identity), so the normalisation is exercised
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
        return {
            "transformer": Flux2Transformer2DModel(**config),
            "vae": vae,
            "text_encoder": tiny_qwen3(config["joint_attention_dim"] // len(self.spec.options["text_layers"]),
                                       layers=max(self.spec.options["text_layers"])),
            "tokenizer": tiny_qwen3_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": Flux2Transformer2DModel, "vae": AutoencoderKLFlux2}

    @property
    def num_double(self) -> int:
        return self.architecture.blocks[0][1]

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, _ = pipe.encode_prompt(
                    prompt, device=self.text_device, max_sequence_length=self.spec.options.get("max_sequence_length", 512),
                    text_encoder_out_layers=tuple(self.spec.options["text_layers"]),
                )
                out.append({"prompt_embeds": embeds[0].float().cpu()})
        return out

    # ---- images -----------------------------------------------------------------------------
    def encode_posterior(self, pixels: torch.Tensor) -> LatentPosterior:
        """The VAE posterior patchified 2 x 2 and normalised by the VAE's batch-norm statistics
        (linear, so applied to mean and std: (p(mean + std * eps) - mu) / sigma)."""
        vae = self.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device=self.device, dtype=vae.dtype)).latent_dist
        patchify = Flux2Pipeline._patchify_latents
        mu = vae.bn.running_mean.view(1, -1, 1, 1).to(vae.dtype)
        sigma = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(vae.dtype)
        return LatentPosterior(mean=(patchify(posterior.mean) - mu) / sigma, std=patchify(posterior.std) / sigma, dtype=self.dtype)

    # ---- the DiT ----------------------------------------------------------------------------
    def _guidance(self, batch: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full((batch,), self.spec.guidance or 4.0, device=self.device)

    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch = noisy_latents.shape[0]
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        latents = noisy_latents.to(device, dtype)
        cond = self.stack_prompt(prompt, batch, device, dtype)
        return {
            "hidden_states": Flux2Pipeline._pack_latents(latents),
            "encoder_hidden_states": cond["prompt_embeds"],
            "timestep": torch.full((batch,), timestep / 1000.0, device=device),
            "img_ids": Flux2Pipeline._prepare_latent_ids(latents[:1]).to(device),
            "txt_ids": Flux2Pipeline._prepare_text_ids(cond["prompt_embeds"][:1]).to(device),
            "guidance": self._guidance(batch),
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
        grid_h, grid_w = noisy_latents.shape[2], noisy_latents.shape[3]
        n_text = inputs["encoder_hidden_states"].shape[1]
        transformer = self.transformer

        def grid(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(z.shape[0], grid_h, grid_w, z.shape[-1])

        taps = {}
        for k in indices:
            if self.block_kind(k) == "double":
                block = transformer.transformer_blocks[k]
                taps[k] = BlockTap(
                    block.norm2, "pre", lambda args, kwargs, out: grid(args[0]),
                    block, "pre", lambda args, kwargs, out: _mlp_set(kwargs["temb_mod_img"], 2),
                )
            else:
                block = transformer.single_transformer_blocks[k - self.num_double]
                taps[k] = BlockTap(
                    block.norm, "pre", lambda args, kwargs, out: grid(args[0][:, n_text:]),
                    block, "pre", lambda args, kwargs, out: _mlp_set(kwargs["temb_mod"], 1),
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
        """As the base class; `prompt` is unused (the shared modulation sees t and guidance only)."""
        indices = self.check_indices(indices)
        self.refuse_conditioning_c(conditioning, 'whose shared modulation is computed from the timestep (and guidance) only (the text enters through attention)')
        transformer = self.transformer
        dtype = transformer.dtype
        # the forward's arithmetic: s and g cast to the model dtype, then x1000
        t = torch.full((1,), timestep / 1000.0, device=self.device).to(dtype) * 1000
        guidance = self._guidance(1)
        guidance = guidance.to(dtype) * 1000 if guidance is not None else None
        with torch.no_grad():
            temb = transformer.time_guidance_embed(t, guidance)
            double = _mlp_set(transformer.double_stream_modulation_img(temb), 2)
            single = _mlp_set(transformer.single_stream_modulation(temb), 1)
        out = {}
        for k in indices:
            m = double if self.block_kind(k) == "double" else single
            out[k] = Modulation(m.shift[0], m.scale[0], m.gate[0])
        return out


class TinyFlux2Adapter(Flux2Adapter):
    """The toy twin: FLUX.2 klein's pipeline layout (Qwen3 text encoder), see the module docstring."""

    pipeline_cls = Flux2KleinPipeline


_TINY_FLUX2 = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # 3 text layers x Qwen3 width 16
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=True,
)

_K, _T, _RULE = rule_defaults(56, "flow")

register(
    ModelSpec(
        name="flux2-dev", family="flux2", hub_id="black-forest-labs/FLUX.2-dev", num_blocks=56, hidden_size=6144,
        default_k=_K, default_t=_T, img_size=640, guidance=4.0, defaults_rule=_RULE,
        description="FLUX.2-dev; 8 double + 48 single blocks, d=6144, modulation shared by all double / all single blocks",
        options={"max_sequence_length": 512, "text_layers": (10, 20, 30)},
        license="FLUX.2 [dev] Non-Commercial License (gated)",
    ),
    Flux2Adapter,
)
register(
    ModelSpec(
        name="tiny-flux2", family="flux2", hub_id=None, num_blocks=4, hidden_size=32, default_k=2, default_t=_T,
        img_size=128, guidance=4.0, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Flux.2 at toy size (2 double + 2 single blocks, d=32; klein layout: Qwen3 text), seeded random weights",
        options={"max_sequence_length": 64, "text_layers": (1, 2, 3), "tiny_config": _TINY_FLUX2, "seed": 0},
    ),
    TinyFlux2Adapter,
)
