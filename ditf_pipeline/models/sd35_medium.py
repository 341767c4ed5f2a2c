"""Stable Diffusion 3.5 Medium (MMDiT-X) and its toy twin `tiny-sd3.5-medium`.

The same `SD3Transformer2DModel` as SD3 / SD3.5 Large, in its MMDiT-X configuration: 24 joint
blocks of width 1536 whose first 13 (`dual_attention_layers` 0..12) carry a second, image-only
self-attention (`attn2`) and a 9-way `SD35AdaLayerNormZeroX` as `norm1`. The capture is
`SD3Adapter`'s (see `sd3.py`): z = input of `block.norm2` (the image stream after both
attentions), shift / scale / gate = items 3, 4, 5 of `block.norm1.linear`'s split (the MLP-side
modulation in both the 6-way and the 9-way norm); the t-only and c-only vectors split
`time_text_embed` into its timestep and pooled-text parts.

Defaults: not the paper's (it did not study this model) but `rule_defaults`: k = 12 of 24,
t = 260 (rectified flow), not tuned on real weights.
"""

from __future__ import annotations

from . import register
from .base import ModelSpec, rule_defaults
from .sd3 import _TINY_SD3, SD3Adapter

_K, _T, _RULE = rule_defaults(24, "flow")

#: the tiny twin keeps the MMDiT-X shape: dual attention in the early blocks only
_TINY_SD35_MEDIUM = {**_TINY_SD3, "num_layers": 4, "dual_attention_layers": (0, 1)}

register(
    ModelSpec(
        name="sd3.5-medium", family="sd3", hub_id="stabilityai/stable-diffusion-3.5-medium", num_blocks=24,
        hidden_size=1536, default_k=_K, default_t=_T, img_size=960, defaults_rule=_RULE,
        description="Stable Diffusion 3.5 Medium (MMDiT-X); 24 joint blocks, blocks 0-12 dual attention, d=1536",
        options={"max_sequence_length": 256}, license="Stability AI Community License (gated)",
    ),
    SD3Adapter,
)
register(
    ModelSpec(
        name="tiny-sd3.5-medium", family="sd3", hub_id=None, num_blocks=4, hidden_size=32, default_k=2,
        default_t=_T, img_size=128, tiny=True, license="MIT (ditf's; random weights)", defaults_rule=_RULE,
        description="SD3.5 Medium (MMDiT-X) at toy size (4 joint blocks, 0-1 dual attention, d=32), seeded random weights",
        options={"max_sequence_length": 32, "tiny_config": _TINY_SD35_MEDIUM, "seed": 1},
    ),
    SD3Adapter,
)
