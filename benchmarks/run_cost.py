"""GPU time and disk of one Flux store key per benchmark, COMPUTED (no GPU, no weights needed).

    python benchmarks/run_cost.py              # prints the table the README and docs/reproducing.md quote

Nothing here is measured. Per benchmark, at the paper's settings (model, k, image size, ensemble):

* disk per image = valid token grid x 3072 channels x 2 bytes (float16 `pre_adaln`) + the nine
  AdaLN vectors in float32. The zero padding up to the key's largest grid compresses to almost
  nothing and float16 features only ~1.05-1.09x, so this raw size is what to plan for.
* GPU floor per image = FLOPs of what the extractor runs (Flux's blocks up to k, early exit, for
  every ensemble member: `extract_gpu.flux_flops`, which `tests/test_benchmarks_run.py` checks
  against torch's FLOP counter) + one VAE encode (1.78 TFLOP at 640 x 640, scaled by pixels),
  divided by an H100's bf16 dense peak (989 TFLOP/s). A real run is slower by its efficiency,
  which no GPU has measured yet (`benchmarks/extract_gpu.py` will).

Image counts are the benchmarks' own (PF-Pascal: an upper bound, two images per pair; AP-10K: per
100 images); where images vary in size, a typical size is used (named in the table).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_gpu import flux_flops  # noqa: E402
from gpu_memory import FLUX_DEV  # noqa: E402

from ditf_pipeline.core.images import model_size  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's data sheet (SXM)
VAE_FLOPS_640 = 1.78e12  # one VAE encode at 640 x 640, counted with torch's flop counter
TEXT_TOKENS = 512  # Flux's T5 sequence length
WIDTH = 3072  # Flux's channels
ADALN_VECTORS = 9  # shift, scale, gate; their t-only and c-only versions
PATCH = 16  # pixels per token side (VAE 8 x patch 2)

#: benchmark -> (images, typical (width, height), image size, resize side, k, ensemble, reproduce command)
BENCHMARKS = {
    "SPair-71k test": (481, (500, 375), 640, "long", 28, 8, "ditf run --model flux --dataset spair"),
    "PF-Pascal test (at most 598 images: 299 pairs)": (598, (500, 375), 640, "long", 28, 8,
                                                   "ditf run --model flux --dataset pfpascal"),
    "AP-10K, per 100 images (split sizes vary)": (100, (500, 375), 640, "long", 28, 8, "ditf run --model flux --dataset ap10k"),
    "HPatches (116 sequences x 6)": (696, (800, 600), 640, "long", 28, 8, "ditf run --model flux --dataset hpatches"),
    "DAVIS-2017 val (30 videos)": (1999, (854, 480), 960, "short", 24, 1, "ditf run --model flux --dataset davis"),
    "ADE20K validation": (2000, (683, 512), 640, "long", 28, 8, "ditf extract --model flux --dataset ade20k"),
    "ADE20K training": (20210, (683, 512), 640, "long", 28, 8, "ditf extract --model flux --dataset ade20k"),
}


def per_image(size: tuple[int, int], img_size: int, side: str, k: int, ensemble: int) -> tuple[int, float, float]:
    """(tokens, bytes on disk, FLOPs) of one image of `size` at the given settings."""
    width, height = model_size(*size, img_size, PATCH, side)
    tokens = (width // PATCH) * (height // PATCH)
    disk = tokens * WIDTH * 2 + ADALN_VECTORS * WIDTH * 4
    flops = flux_flops(FLUX_DEV, tokens, TEXT_TOKENS, k, ensemble)["total"] + VAE_FLOPS_640 * width * height / 640**2
    return tokens, disk, flops


def main() -> None:
    print("| benchmark | images | typical image -> tokens | k, ensemble | disk per key | GPU floor (H100 bf16 peak) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (count, size, img_size, side, k, ensemble, _) in BENCHMARKS.items():
        tokens, disk, flops = per_image(size, img_size, side, k, ensemble)
        seconds = flops / H100_BF16_DENSE
        print(f"| {name} | {count} | {size[0]}x{size[1]} -> {tokens} | {k}, {ensemble} | "
              f"{count * disk / 1e9:.1f} GB ({disk / 1e6:.1f} MB/image) | "
              f"{count * seconds / 60:.1f} min ({flops / 1e12:.1f} TFLOP/image) |")


if __name__ == "__main__":
    main()
