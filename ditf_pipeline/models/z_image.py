"""Z-Image (Turbo) and its toy twin `tiny-z-image`.

`ZImageTransformer2DModel`: a single-stream DiT of 30 `ZImageTransformerBlock`s (`layers`, width
3840) over the joint sequence [image; caption], preceded by refiner blocks on each stream alone:
`noise_refiner` (image, modulated) and `context_refiner` (caption, unmodulated). Only `layers`
are numbered as blocks k; the refiners always run.

Each modulated block owns `adaLN_modulation` (Linear, 256 -> 4D) of the timestep embedding
`t_embedder(t)`: scale_msa, gate_msa, scale_mlp, gate_mlp, no shift; its norms are RMSNorms
with a learned weight. The MLP side is ``ffn_norm1(x) * (1 + scale_mlp)``, then
``x + tanh(gate_mlp) * ffn_norm2(feed_forward(...))``. So, as the paper's appendix C:

* z = input of `layers[k].ffn_norm1` (the stream after attention), the image tokens (they come
  first in the joint sequence, row-major on the latent grid);
* scale, gate = items 2 and 3 of `layers[k].adaLN_modulation`'s output split 4 ways (the gate
  as regressed: the block applies tanh); norm_weight = `layers[k].ffn_norm1.weight`; no shift.

Per-token modulation: in its omni mode (reference images) the block regresses one vector set
for noisy tokens (from t) and one for clean tokens (from t = 1) and picks per token. Feature
extraction is text-to-image inference, where every image token is a noisy token: the forward
runs in basic mode, the one vector set applies to all tokens, and that set (the noisy-token
vectors) is what each key stores. The variants apply ``rmsnorm(z) * norm_weight * (1 + scale)``
(key config ``"norm": "rms"``). The modulation sees the timestep only: `adaln-t` equals `adaln`
and `adaln-c` is refused. Noise: flow matching, x_t = s * noise + (1 - s) * x0, s = t / 1000; the
transformer takes 1 - s (times its `t_scale` inside), as `ZImagePipeline` passes it. Latents:
the Flux VAE (shift and scale factors), patch 2: a token is 16 x 16 pixels. Prompts: the
pipeline's Qwen3 chat template, the second-to-last hidden state of the valid tokens (stored
padded with a zero mask so prompts batch; the transformer gets the valid tokens only).

Defaults: `rule_defaults` (k = 15 of 30, t = 260), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise
from ._tiny_text import tiny_qwen3, tiny_qwen3_tokenizer
from .base import (
    BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults,
)
from .flux import tiny_vae
from .lumina2 import check_rms_eps, jitter_norm_weights


def _mlp_modulation(block, linear_output: torch.Tensor) -> Modulation:
    """scale_mlp, gate_mlp (items 2, 3 of 4) and the MLP-side norm's weight, float32."""
    chunks = linear_output.float().chunk(4, dim=-1)
    weight = block.ffn_norm1.weight.float()
    if chunks[2].ndim == 2:
        weight = weight.expand(chunks[2].shape[0], -1)
    return Modulation(None, chunks[2], chunks[3], weight)


class ZImageAdapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = ZImagePipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("layers", "n_layers", "joint"),)
    separates_conditioning = False
    modulated_norm = "rms"
    width_entries = ("dim",)  # Z-Image's config names its width `dim`

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": jitter_norm_weights(ZImageTransformer2DModel(**config)),
            "vae": tiny_vae(config["in_channels"], scaling_factor=0.3611, shift_factor=0.1159),
            "text_encoder": tiny_qwen3(config["cap_feat_dim"]),
            "tokenizer": tiny_qwen3_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": ZImageTransformer2DModel, "vae": AutoencoderKL}

    def check_config(self, config: dict) -> None:
        check_rms_eps(self.spec.name, config)

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        length = self.spec.options.get("max_sequence_length", 512)
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds = pipe.encode_prompt(prompt, device=self.text_device, do_classifier_free_guidance=False,
                                            max_sequence_length=length)[0][0].float().cpu()
                mask = torch.zeros(length)
                mask[: embeds.shape[0]] = 1.0
                padded = torch.zeros(length, embeds.shape[1])
                padded[: embeds.shape[0]] = embeds
                out.append({"prompt_embeds": padded, "prompt_attention_mask": mask})
        return out

    # ---- the DiT ----------------------------------------------------------------------------
    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch = noisy_latents.shape[0]
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        cond = self.stack_prompt(prompt, batch, device, dtype)
        valid = cond["prompt_attention_mask"] > 0.5
        return {
            "x": list(noisy_latents.to(device, dtype).unsqueeze(2).unbind(dim=0)),
            "t": torch.full((batch,), 1.0 - timestep / 1000.0, device=device),
            "cap_feats": [cond["prompt_embeds"][i][valid[i]] for i in range(batch)],
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
            block = transformer.layers[k]
            taps[k] = BlockTap(
                block.ffn_norm1, "pre",
                lambda args, kwargs, out: args[0][:, : grid_h * grid_w].reshape(args[0].shape[0], grid_h, grid_w, -1),
                block.adaLN_modulation, "post", lambda args, kwargs, out, block=block: _mlp_modulation(block, out),
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
        self.refuse_conditioning_c(conditioning, 'whose modulation is regressed from the timestep only (the caption enters through joint attention)')
        transformer = self.transformer
        t = torch.full((1,), 1.0 - timestep / 1000.0, device=self.device)
        with torch.no_grad():
            adaln_input = transformer.t_embedder(t * transformer.t_scale).to(transformer.dtype)
            out = {}
            for k in indices:
                block = transformer.layers[k]
                m = _mlp_modulation(block, block.adaLN_modulation(adaln_input))
                out[k] = Modulation(None, m.scale[0], m.gate[0], m.norm_weight[0])
        return out


_TINY_Z_IMAGE = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=4,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=16,  # Qwen3 width
    axes_dims=[4, 6, 6],  # sums to the head size
    axes_lens=[1024, 64, 64],
)

_K, _T, _RULE = rule_defaults(30, "flow")

register(
    ModelSpec(
        name="z-image-turbo", family="z-image", hub_id="Tongyi-MAI/Z-Image-Turbo", num_blocks=30, hidden_size=3840,
        default_k=_K, default_t=_T, img_size=1024, defaults_rule=_RULE,
        description="Z-Image-Turbo; 30 single-stream blocks (+ refiners), d=3840, scale-only RMSNorm modulation from t only",
        options={"max_sequence_length": 512}, license="Apache-2.0",
    ),
    ZImageAdapter,
)
register(
    ModelSpec(
        name="tiny-z-image", family="z-image", hub_id=None, num_blocks=4, hidden_size=32, default_k=2,
        default_t=_T, img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Z-Image at toy size (4 blocks, d=32, Qwen3 and VAE at toy size), seeded random weights",
        options={"max_sequence_length": 128, "tiny_config": _TINY_Z_IMAGE, "seed": 0},
    ),
    ZImageAdapter,
)
