"""GPU memory of `ditf extract`, COMPUTED (no GPU needed): parameters of the truncated models + an activation estimate.

    python benchmarks/gpu_memory.py            # prints the table of docs/models.md (markdown)

Parameters are counted exactly: each real model's transformer is built from its published
config on the meta device (no memory), its block lists cut after block k as ditf loads it, and
its parameters counted; likewise the VAE (loaded whole) and the text encoders. Activations are
an estimate, not a measurement:

    DiT  = 36 * B * N * d bytes      16 live bf16 tensors of B x N x d in the widest block (4d MLP
                                     hidden + GELU output, q/k/v, RoPE's fp32 temporaries, residual)
                                     + the captured feature in fp32; memory-efficient attention
                                     (no N x N matrix), N = image + text tokens, d = width
    VAE  = 4 * 128 * B * H * W * s   four 128-channel full-resolution maps in the first down block,
                                     s = 2 bytes (bf16; 4 if the VAE runs in fp32)
    peak = DiT params + VAE params + max(DiT, VAE activations) + 1 GiB (CUDA context, allocator slack)

With --offload only the parameters outside the blocks plus the largest block are on the GPU.
Text encoders on the GPU (--text-device cuda) run before the DiT is loaded and are freed first,
so their own peak (encoders + a few hundred MB) is listed separately, not added.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2**30

# published transformer configs (the models' transformer/config.json)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                  joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192, qk_norm="rms_norm")
PIXART_XL_1024 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                      cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                      norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096)
VAE16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
VAE4 = dict(VAE16, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              max_position_embeddings=77, projection_dim=1280)

#: name, transformer class, config, block lists (attr, config entry), paper k, image side, text tokens, VAE, text encoders
MODELS = [
    ("flux", "FluxTransformer2DModel", FLUX_DEV, (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
     28, 640, 512, VAE16, ("clip-l", "t5-xxl")),
    ("sd3", "SD3Transformer2DModel", SD3_MEDIUM, (("transformer_blocks", "num_layers"),), 9, 960, 77 + 256, VAE16,
     ("clip-l", "clip-g", "t5-xxl")),
    ("sd3.5", "SD3Transformer2DModel", SD35_LARGE, (("transformer_blocks", "num_layers"),), 23, 960, 77 + 256, VAE16,
     ("clip-l", "clip-g", "t5-xxl")),
    ("pixart-alpha", "PixArtTransformer2DModel", PIXART_XL_1024, (("transformer_blocks", "num_layers"),), 14, 960, 120, VAE4,
     ("t5-xxl",)),
]


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dit_parameters(cls_name: str, config: dict, block_lists, k: int) -> dict:
    """Parameters of the transformer cut after block k: total, outside the blocks, largest block."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    start = 0
    for attr, entry in block_lists:
        count = config[entry]
        setattr(model, attr, getattr(model, attr)[: min(max(k + 1 - start, 0), count)])
        start += count
    blocks = [b for attr, _ in block_lists for b in getattr(model, attr)]
    in_blocks = sum(_numel(b) for b in blocks)
    return {"total": _numel(model), "outside": _numel(model) - in_blocks, "largest_block": max(map(_numel, blocks))}


def other_parameters(vae: dict, encoders) -> tuple[int, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    build = {"t5-xxl": lambda: T5EncoderModel(T5Config(**T5_XXL)),
             "clip-l": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
             "clip-g": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}
    with torch.device("meta"):
        return _numel(AutoencoderKL(**vae)), sum(_numel(build[name]()) for name in encoders)


def main() -> None:
    rows = []
    for name, cls_name, config, block_lists, paper_k, side, n_txt, vae, encoders in MODELS:
        d = config["num_attention_heads"] * config["attention_head_dim"]
        n_blocks = sum(config[entry] for _, entry in block_lists)
        n_img = (side // 16) ** 2
        vae_params, text_params = other_parameters(vae, encoders)
        for k in sorted({paper_k, n_blocks - 1}):
            params = dit_parameters(cls_name, config, block_lists, k)
            for batch in (8, 4, 1):
                dit_act = 36 * batch * (n_img + n_txt) * d
                vae_act = 4 * 128 * batch * side * side * 2
                common = 2 * vae_params + max(dit_act, vae_act) + GIB
                rows.append((name, k, n_blocks, side, batch, params, vae_params, text_params,
                             (2 * params["total"] + common) / GIB,
                             (2 * (params["outside"] + params["largest_block"]) + common) / GIB))
    print("| model | k (blocks loaded) | image | ensemble 8, batch | DiT params loaded | peak GPU, computed | "
          "peak GPU with --offload, computed | text encoders on GPU (--text-device cuda), computed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, k, n_blocks, side, batch, params, vae_params, text_params, peak, offload in rows:
        print(f"| {name} | {k} ({k + 1} of {n_blocks}) | {side}² | {batch} | {params['total'] / 1e9:.2f} B "
              f"({2 * params['total'] / GIB:.1f} GiB bf16) | {peak:.1f} GiB | {offload:.1f} GiB | "
              f"{2 * text_params / GIB + 1:.1f} GiB |")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
