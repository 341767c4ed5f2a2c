"""PixArt-Sigma (PixArt-Sigma-XL-2-1024-MS) and its toy twin `tiny-pixart-sigma`.

The transformer is PixArt-alpha's `PixArtTransformer2DModel` (28 `BasicTransformerBlock`s with
`ada_norm_single`, d = 1152); what differs is the pipeline (`PixArtSigmaPipeline`: 300 T5
tokens, the SDXL VAE) and no size micro-conditioning. The capture is `PixArtAdapter`'s (see
`pixart.py`): z = input of `block.norm2` (image tokens after self- and cross-attention);
shift, scale, gate = items 3, 4, 5 of `block.scale_shift_table[None] + adaln_single(t)`. The AdaLN
sees the timestep only, so `adaln-t` equals `adaln` and `adaln-c` is refused.

Defaults: `rule_defaults` (k = 14 of 28, t = 141: PixArt-alpha's DDPM values), not tuned on
real weights.
"""

from __future__ import annotations

from diffusers import PixArtSigmaPipeline

from . import register
from .base import ModelSpec, rule_defaults
from .pixart import _TINY_PIXART, PixArtAdapter


class PixArtSigmaAdapter(PixArtAdapter):
    pipeline_cls = PixArtSigmaPipeline


_K, _T, _RULE = rule_defaults(28, "ddpm")

register(
    ModelSpec(
        name="pixart-sigma", family="pixart", hub_id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", num_blocks=28,
        hidden_size=1152, default_k=_K, default_t=_T, img_size=960, defaults_rule=_RULE,
        description="PixArt-Sigma XL-2 1024-MS; 28 blocks, d=1152, AdaLN-single on t only",
        options={"max_sequence_length": 300}, license="CreativeML Open RAIL++-M",
    ),
    PixArtSigmaAdapter,
)
register(
    ModelSpec(
        name="tiny-pixart-sigma", family="pixart", hub_id=None, num_blocks=4, hidden_size=48, default_k=2,
        default_t=_T, img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="PixArt-Sigma at toy size (4 blocks, d=48), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_PIXART, "seed": 1},
    ),
    PixArtSigmaAdapter,
)
