"""Chroma (Chroma1-HD) and its toy twin `tiny-chroma`.

Flux's layout (`ChromaTransformer2DModel`: 19 double-stream then 38 single-stream blocks, width
3072, paper numbering as Flux: block k >= 19 is `single_transformer_blocks[k - 19]`) with
*pruned* AdaLN: no block owns a modulation linear. A separate approximator network
(`distilled_guidance_layer`) maps the timestep (with guidance fixed at 0 and a constant index
embedding per modulation slot, `time_text_embed`) to one table `pooled_temb` (B, M, D) of every
modulation vector of the model; the forward slices each block's rows out of it:

* single block i: rows 3i .. 3i+2 (shift, scale, gate), passed as `norm`'s `emb`;
* double block j: image rows 3S + 6j .. 3S + 6j + 5 (S = number of single blocks), passed as
  `norm1`'s `emb` (then the text rows, for `norm1_context`).

Captured, as for Flux:

* double block k: z = input of `transformer_blocks[k].norm2` (image stream after attention);
  shift, scale, gate = items 3, 4, 5 of `norm1`'s `emb` (flattened, split 6 ways: the MLP side);
* single block k: z = input of `single_transformer_blocks[k - S].norm` on the image tokens (the
  block sees [text; image]); shift, scale, gate = the 3-way split of that `norm`'s `emb`.

The text never enters the approximator: the modulation depends on t alone, so `adaln-t` equals
`adaln` and `adaln-c` is refused. Because the forward reads its block lists' lengths to find each
block's rows, cut lists keep their length (`keep_list_lengths`). Noise: rectified flow as Flux
(the transformer takes s = t / 1000 and multiplies by 1000). Text: T5 with its attention mask;
the transformer masks all text padding but the first pad token and sees every image token, as
`ChromaPipeline` does.

Defaults: `rule_defaults` (k = 28 of 57, t = 260: Flux's), not tuned on real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

from . import register
from ._diffusers import DiffusersAdapter, RectifiedFlowNoise, chunk_modulation
from ._tiny_text import tiny_t5, tiny_t5_tokenizer
from .base import BlockFeatures, BlockTap, Conditioning, ModelSpec, Modulation, PromptEmbedding, Prompts, rule_defaults
from .flux import tiny_vae


class ChromaAdapter(RectifiedFlowNoise, DiffusersAdapter):
    pipeline_cls = ChromaPipeline
    text_components = ("text_encoder", "tokenizer")
    block_lists = (("transformer_blocks", "num_layers", "double"), ("single_transformer_blocks", "num_single_layers", "single"))
    separates_conditioning = False
    keep_list_lengths = True

    # ---- construction -----------------------------------------------------------------------
    def build_tiny_components(self) -> dict:
        config = self.spec.options["tiny_config"]
        return {
            "transformer": ChromaTransformer2DModel(**config),
            "vae": tiny_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": tiny_t5(config["joint_attention_dim"]),
            "tokenizer": tiny_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def dit_classes(self) -> dict[str, type]:
        return {"transformer": ChromaTransformer2DModel, "vae": AutoencoderKL}

    @property
    def num_double(self) -> int:
        return self.architecture.blocks[0][1]

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        pipe = self.text_pipe()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                embeds, _, mask, *_ = pipe.encode_prompt(
                    prompt, device=self.text_device, do_classifier_free_guidance=False,
                    max_sequence_length=self.spec.options.get("max_sequence_length", 512),
                )
                # the transformer's text mask (1 = attend): every real token and the first pad token
                out.append({"prompt_embeds": embeds[0].float().cpu(), "prompt_attention_mask": mask[0].float().cpu()})
        return out

    # ---- the DiT ----------------------------------------------------------------------------
    def _inputs(self, noisy_latents: torch.Tensor, prompt: Prompts, timestep: int) -> dict:
        batch, channels, height, width = noisy_latents.shape
        transformer = self.transformer
        dtype, device = transformer.dtype, self.device
        hidden = ChromaPipeline._pack_latents(noisy_latents.to(device, dtype), batch, channels, height, width)
        image_ids = ChromaPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
        cond = self.stack_prompt(prompt, batch, device, dtype)
        n_text = cond["prompt_embeds"].shape[1]
        mask = None
        if "prompt_attention_mask" in cond:  # as ChromaPipeline._prepare_attention_mask: text mask, then every image token
            ones = torch.ones(batch, hidden.shape[1], device=device, dtype=torch.bool)
            mask = torch.cat([cond["prompt_attention_mask"], ones], dim=1)
        return {
            "hidden_states": hidden,
            "encoder_hidden_states": cond["prompt_embeds"],
            "timestep": torch.full((batch,), timestep / 1000.0, device=device),
            "img_ids": image_ids,
            "txt_ids": torch.zeros(n_text, 3, device=device, dtype=dtype),
            "attention_mask": mask,
            "return_dict": False,
        }

    def _norm(self, k: int) -> tuple[torch.nn.Module, int, tuple[int, int, int]]:
        """Block k's pruned AdaLN (whose `emb` holds its vectors), the split, and which items are (shift, scale, gate)."""
        transformer = self.transformer
        if self.block_kind(k) == "double":
            return transformer.transformer_blocks[k].norm1, 6, (3, 4, 5)
        return transformer.single_transformer_blocks[k - self.num_double].norm, 3, (0, 1, 2)

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
            norm, parts, take = self._norm(k)

            def read_modulation(args, kwargs, out, parts=parts, take=take) -> Modulation:
                return Modulation(*chunk_modulation(kwargs["emb"].flatten(1, 2), parts, take))

            if self.block_kind(k) == "double":
                feature = (transformer.transformer_blocks[k].norm2, "pre", lambda args, kwargs, out: grid(args[0]))
            else:
                feature = (norm, "pre", lambda args, kwargs, out: grid(args[0][:, n_text:]))
            taps[k] = BlockTap(*feature, norm, "pre", read_modulation)
        return self.capture(taps, lambda: transformer(**inputs), stop_early)

    def _rows(self, k: int) -> slice:
        """Block k's rows of the approximator's table, from the config's block counts (as the
        forward computes them from the full lists)."""
        config = self.transformer_config()
        singles = int(config["num_single_layers"])
        if self.block_kind(k) == "double":
            start = 3 * singles + 6 * k
            return slice(start, start + 6)
        start = 3 * (k - self.num_double)
        return slice(start, start + 3)

    def modulation(
        self,
        prompt: PromptEmbedding,
        timestep: int,
        indices: Sequence[int],
        conditioning: Conditioning = "tc",
        image_size: tuple[int, int] | None = None,
    ) -> dict[int, Modulation]:
        """As the base class; `prompt` is unused (the approximator sees t only)."""
        indices = self.check_indices(indices)
        self.refuse_conditioning_c(conditioning, 'whose modulation comes from an approximator network of the timestep only (the text enters through attention)')
        transformer = self.transformer
        dtype = transformer.dtype
        # the forward's arithmetic: s cast to the model dtype, then x1000
        t = torch.full((1,), timestep / 1000.0, device=self.device).to(dtype) * 1000
        with torch.no_grad():
            table = transformer.distilled_guidance_layer(transformer.time_text_embed(t))
            out = {}
            for k in indices:
                _, parts, take = self._norm(k)
                chunks = chunk_modulation(table[:, self._rows(k)].flatten(1, 2), parts, take)
                out[k] = Modulation(*(v[0] for v in chunks))
        return out


_TINY_CHROMA = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
    approximator_num_channels=16,
    approximator_hidden_dim=32,
    approximator_layers=2,
)

_K, _T, _RULE = rule_defaults(57, "flow")

register(
    ModelSpec(
        name="chroma", family="chroma", hub_id="lodestones/Chroma1-HD", num_blocks=57, hidden_size=3072,
        default_k=_K, default_t=_T, img_size=640, defaults_rule=_RULE,
        description="Chroma1-HD; Flux layout (19 double + 38 single blocks, d=3072), pruned AdaLN from an approximator of t",
        options={"max_sequence_length": 512}, license="Apache-2.0",
    ),
    ChromaAdapter,
)
register(
    ModelSpec(
        name="tiny-chroma", family="chroma", hub_id=None, num_blocks=4, hidden_size=32, default_k=2, default_t=_T,
        img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="Chroma at toy size (2 double + 2 single blocks, d=32), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_CHROMA, "seed": 0},
    ),
    ChromaAdapter,
)
