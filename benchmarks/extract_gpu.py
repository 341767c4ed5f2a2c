"""GPU extraction throughput against the hardware's FLOP floor and against the authors' style of run.

    python benchmarks/extract_gpu.py                 # on a GPU: full-size Flux (and SD3.5-large), bf16
    python benchmarks/extract_gpu.py --tiny          # CPU smoke (< 1 min): same code, toy widths
                                                     # (the lean row compiles with aot_eager there)

What it measures (all with random weights, which cost exactly what real weights cost):

Inputs: SPair-71k's aspect ratios (500x375, 375x500, 500x333, 333x500 in SPair-like
proportions, so token grids differ and groups of one grid are partial), resized as ditf does
(long side 640 for Flux: ~1,200 image tokens, not a square's 1,600), at least 32 timed images
(`--images`). Every prompt of the run is encoded (and cached in the store) BEFORE any clock
starts; warm-ups run on their own images of the same aspect mix.

* ours: the real `Extractor` (decode-ahead threads, writer thread, text encoders never resident,
  early exit after block k) into a real Zarr store, with ditf's CUT model (blocks after k never
  built, as `ditf extract` loads it); ensemble 8 in one batch, k=28; images/s, peak GPU memory
  at 1 image per forward, and the seconds of the timed run spent outside the image loop. Eager
  blocks, one image per forward (`--compile off --batch-images 1`): the path before the lean one.
* lean: the same `Extractor` as `ditf extract` runs it on CUDA by default: the blocks that run
  compiled one at a time (`--compile on`, inductor), images of one token grid batched
  (`--batch-images 4`: 32 rows per forward at ensemble 8), no host wait per image (pinned,
  non-blocking copies; the store writer waits for the copies). Warm-up: a whole batch and two
  partial ones of other grids, timed as the compile seconds; the graphs compiled per block kind
  (`models.compiled.compiled_graphs`) are reported for the warm-up and for the timed run (0
  expected there). Peak GPU memory at 4 images per forward. On a GPU the run also counts the
  synchronizing calls PyTorch flags (`torch.cuda.set_sync_debug_mode`) during the lean run.
* floor: the FLOPs of what actually runs per image (the 19 double blocks, 9 single blocks and the
  modulation linear of single block 28 where the early exit stops, plus the input embedders) x
  the ensemble, counted analytically and cross-checked with `torch.utils.flop_counter`, divided
  by the bf16 matmul ceiling measured on the same device in the same run (a large torch.matmul).
  fraction of floor = floor seconds per image / measured seconds per image (1.0 = the hardware limit).
  The floor also counts one VAE encode of the image (counted by the same flop counter).
* baseline (the authors' `eval_spair.py`, github.com/ganchaofan0000/DiTF), with their
  ``torch.backends.cudnn.benchmark = True`` and the whole model resident: a T5-XXL-sized and a
  CLIP-L-sized random text encoder resident on the GPU next to the DiT, the prompt encoded for
  every image, one image at a time (decode, encode prompt, float32 VAE on the ensemble's
  copies, the DiT through block k IN FULL plus the final layer: no early exit, features to
  host, saved), no overlap; its FLOPs per image are counted the same way (DiT + VAE).
* SD3.5-large (38 joint blocks, d=2432) at its paper defaults (960 px, k=23): ours only.

Results go to benchmarks/results/extract_gpu-<device>.{json,md} when run on a GPU (or --out DIR).
Flags left as hooks for GPU tuning: --sdpa (attention kernel choice); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditf_pipeline.datasets import get_dataset  # noqa: E402
import ditf_pipeline.extract.extractor as extractor_module  # noqa: E402
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings  # noqa: E402
from ditf_pipeline.models.base import CompileOptions  # noqa: E402
from ditf_pipeline.core.images import load_rgb, model_size, preprocess  # noqa: E402
from ditf_pipeline.extract.prompts import prompts_for  # noqa: E402
from ditf_pipeline.models.compiled import compiled_graphs, reset_compiled_graphs  # noqa: E402
from ditf_pipeline.models import DTYPES, load_adapter, resolve_device  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

# ---- architectures ------------------------------------------------------------------------------
FLUX = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
)
#: the Flux / SD3 VAE (16 latent channels, factor 8)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768)

# --tiny: full depth, toy width (the block structure, the early exit and the counting are the same)
TINY_FLUX = dict(FLUX, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=(4, 6, 6))
TINY_SD35 = dict(SD35_LARGE, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
                 pooled_projection_dim=64, pos_embed_max_size=32, sample_size=32)
TINY_VAE = dict(VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
TINY_T5 = dict(T5_XXL, vocab_size=512, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=24)
TINY_CLIP = dict(CLIP_L, vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(module_fn, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random-init a module directly on the device in its dtype (no fp32 host copy of 12B params)."""
    with torch.device(device), _default_dtype(dtype):
        module = module_fn()
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def cut_config(family: str, config: dict, k: int) -> dict:
    """The transformer config with the blocks after k removed: the model `ditf extract` builds."""
    if family == "flux":
        if k >= config["num_layers"]:
            return dict(config, num_single_layers=k - config["num_layers"] + 1)
        return dict(config, num_layers=k + 1, num_single_layers=0)
    return dict(config, num_layers=k + 1)


def build_adapter(family: str, config: dict, vae_config: dict, device: torch.device, dtype: str, n_txt: int):
    """The real adapter of the family around a full-size (or --tiny) random-weight DiT and VAE
    (pass `cut_config(...)` for ditf's cut model, the whole config for the authors' resident one)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    name = {"flux": "tiny-flux", "sd3": "tiny-sd3"}[family]
    adapter = load_adapter(name, dtype=dtype, device=str(device))
    spec = adapter.spec
    if family == "flux":
        blocks = config["num_layers"] + config["num_single_layers"]
        cls, options = FluxTransformer2DModel, dict(spec.options, num_double=config["num_layers"], max_sequence_length=512)
        width = config["num_attention_heads"] * config["attention_head_dim"]
        text = {"prompt_embeds": (n_txt, config["joint_attention_dim"]), "pooled_prompt_embeds": (config["pooled_projection_dim"],)}
    else:
        blocks, cls, options = config["num_layers"], SD3Transformer2DModel, dict(spec.options, max_sequence_length=256)
        width = config["caption_projection_dim"]
        text = {"prompt_embeds": (n_txt, config["joint_attention_dim"]), "pooled_prompt_embeds": (config["pooled_projection_dim"],)}
    adapter.spec = replace(spec, num_blocks=blocks, hidden_size=width, options=dict(options, tiny_config=config))
    torch_dtype = DTYPES[dtype]
    adapter._tiny_components = {
        "transformer": _build(lambda: cls(**config), device, torch_dtype),
        "vae": _build(lambda: AutoencoderKL(**vae_config, shift_factor=0.1159, scaling_factor=0.3611), device, torch_dtype),
    }
    # prompts are encoded once per distinct prompt and cached in the store: random embeddings of the real shapes
    adapter.encode_prompts = lambda prompts: [{n: torch.randn(*shape) for n, shape in text.items()} for _ in prompts]
    return adapter


# ---- inputs -------------------------------------------------------------------------------------
#: SPair-71k's common image sizes (W, H) and their shares of the timed images (landscape first)
ASPECTS = {(500, 375): 0.4, (375, 500): 0.28, (500, 333): 0.19, (333, 500): 0.13}


def _category(width: int, height: int) -> str:
    return f"a{width}x{height}"  # the folder dataset's category: one prompt per aspect ratio


def aspect_shares(records) -> dict[tuple[int, int], float]:
    """(W, H) -> share of `records` at that size (read back from the folder's category names)."""
    counts: dict[tuple[int, int], int] = {}
    for record in records:
        width, height = (int(v) for v in record.category[1:].split("x"))
        counts[(width, height)] = counts.get((width, height), 0) + 1
    return {size: count / len(records) for size, count in counts.items()}


def write_aspect_folder(root: Path, n_images: int, batch: int) -> None:
    """Images at SPair's sizes in a folder dataset: ``e*`` the eager warm-up (one image), ``w*``
    the lean warm-up (a whole batch of one grid and partial batches of two others: the batch
    shapes the timed run meets), ``t*`` the `n_images` timed ones in SPair-like proportions
    (so groups of one grid end partial)."""
    rng = np.random.default_rng(0)
    sizes = list(ASPECTS)
    counts = [int(n_images * share) for share in ASPECTS.values()]
    counts[0] += n_images - sum(counts)
    plan = [("e", sizes[0])] + [("w", sizes[0])] * batch + [("w", sizes[1])] + [("w", sizes[2])] * min(2, batch)
    plan += [("t", size) for size, count in zip(sizes, counts) for _ in range(count)]
    from PIL import Image

    for i, (role, (width, height)) in enumerate(plan):
        folder = root / _category(width, height)
        folder.mkdir(parents=True, exist_ok=True)
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / f"{role}{i:04d}.png")


# ---- FLOPs --------------------------------------------------------------------------------------
def flux_flops(config: dict, n_img: int, n_txt: int, k: int, batch: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of a Flux forward stopped at block k, as the adapter runs it.

    Double block: qkv 6Nd^2, attention 4N^2 d, out projections 2Nd^2, MLPs 16Nd^2 (N = text +
    image tokens, both streams), modulation linears 2 x 2d(6d) per sample. Single block: qkv 6Nd^2,
    attention 4N^2 d, proj_mlp 8Nd^2, proj_out 10Nd^2, modulation 2d(3d). The early exit fires on
    the output of single block k's modulation (norm), so that block contributes its modulation only.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n = n_img + n_txt
    n_double = config["num_layers"]
    attention = 4 * n * n * d
    double = 24 * n * d * d + attention + 2 * 2 * d * 6 * d
    single = 24 * n * d * d + attention + 2 * d * 3 * d
    embed = 2 * n_img * config["in_channels"] * d + 2 * n_txt * config["joint_attention_dim"] * d
    embed += 2 * (256 * d + d * d) * (2 if config["guidance_embeds"] else 1) + 2 * (config["pooled_projection_dim"] * d + d * d)
    if k >= n_double:  # all double blocks, single blocks before k, and block k's modulation linear
        total = embed + n_double * double + (k - n_double) * single + 2 * d * 3 * d
    else:  # double blocks before k, and block k up to norm2's input (everything but its MLPs)
        total = embed + k * double + double - 16 * n * d * d
    return {"total": batch * total, "per_block_double": batch * double, "per_block_single": batch * single}


def counted_flops(adapter, noisy: torch.Tensor, prompt, t: int, k: int, stop_early: bool = True) -> int:
    """FLOPs of one `forward_intermediates` call as torch's flop counter sees them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # the math kernel decomposes attention into counted matmuls (not every fused CPU kernel is
    # registered with the counter); the FLOPs are the same whichever kernel runs
    with counter, sdpa_kernel(SDPBackend.MATH):
        adapter.forward_intermediates(noisy, prompt, t, [k], stop_early=stop_early)
    return int(counter.get_total_flops())


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Achieved FLOP/s of a large square matmul (the practical ceiling of this device and dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- the two ways of running ------------------------------------------------------------------
def run_ours(adapter, dataset, warm_records, records, settings: ExtractSettings, tmp: Path, device,
             label: str = "ours", sync_check: bool = False) -> dict:
    """`warm_records` untimed (allocator, kernels, compiles), then `records` timed.

    Every prompt of both is encoded into the store's prompt cache first, outside every clock
    (the text encoders are loaded, run and released there); the image loop (`Extractor._extract`)
    is timed on its own, so what the timed run spends around it is reported too.
    """
    extractor = Extractor(adapter, FeatureStore(tmp / f"{label}-{adapter.spec.family}.zarr"), settings)
    start = time.perf_counter()
    extractor.encode_prompts(set(prompts_for(list(warm_records) + list(records), settings.prompt).values()))
    prompt_seconds = time.perf_counter() - start
    loop = {"seconds": 0.0}
    image_loop = extractor._extract

    def timed_loop(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return image_loop(*args, **kwargs)
        finally:
            _sync(device)
            loop["seconds"] += time.perf_counter() - begin

    extractor._extract = timed_loop
    torch._dynamo.reset()
    reset_compiled_graphs()
    try:
        start = time.perf_counter()
        extractor.run(dataset, progress=False, records=warm_records)
        _sync(device)
        warm_seconds = time.perf_counter() - start
        warm_graphs = compiled_graphs()
        reset_compiled_graphs()
        _reset_peak(device)
        flagged: list[str] = []
        loop["seconds"] = 0.0
        with _sync_warnings(device, flagged) if sync_check else contextlib.nullcontext():
            start = time.perf_counter()
            report = extractor.run(dataset, progress=False, records=records)
            _sync(device)
            seconds = time.perf_counter() - start
        timed_graphs = compiled_graphs()
    finally:
        adapter.set_compile(None)  # FLOP counting and the baseline run eagerly
    out = {"images": report.extracted, "seconds": seconds, "images_per_s": report.extracted / seconds,
           "image_loop_seconds": loop["seconds"], "seconds_outside_image_loop": seconds - loop["seconds"],
           "prompt_seconds_before_clock": prompt_seconds, "warm_up_images": len(warm_records),
           "warm_up_seconds": warm_seconds, "compiled_graphs_warm_up": warm_graphs,
           "compiled_graphs_timed_run": timed_graphs,
           "peak_gpu_gib": _peak_gib(device), "compile": settings.compile, "batch_images": settings.batch_images}
    if sync_check and device.type == "cuda":
        out["host_syncs_flagged"] = len(flagged)
        out["host_sync_examples"] = sorted(set(flagged))[:5]
    return out


@contextlib.contextmanager
def _sync_warnings(device, flagged: list[str]):
    """Collect PyTorch's warnings about calls that make the host wait for the GPU (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        # where in Python each one was called from (the writer thread's wait for its copies is expected)
        flagged.extend(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def build_text_encoders(device, dtype, tiny: bool):
    """Random T5-XXL-sized and CLIP-L-sized encoders (the real configs), resident as in the authors' script."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(1)
    t5 = _build(lambda: T5EncoderModel(T5Config(**(TINY_T5 if tiny else T5_XXL))), device, dtype)
    clip = _build(lambda: CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L))), device, dtype)
    return t5, clip


@contextlib.contextmanager
def through_block(adapter, k: int):
    """The Flux transformer truncated after block k: the authors' `forward_feat` breaks out of the
    block loop after block k (which runs in full) and then still applies the final layer."""
    transformer = adapter.transformer
    n_double = len(transformer.transformer_blocks)
    singles = transformer.single_transformer_blocks
    if k >= n_double:
        transformer.single_transformer_blocks = torch.nn.ModuleList(list(singles)[: k - n_double + 1])
    else:
        doubles = transformer.transformer_blocks
        transformer.transformer_blocks = torch.nn.ModuleList(list(doubles)[: k + 1])
        transformer.single_transformer_blocks = torch.nn.ModuleList()
    try:
        yield transformer
    finally:
        transformer.single_transformer_blocks = singles
        if k < n_double:
            transformer.transformer_blocks = doubles


def authors_vae(adapter, device) -> torch.nn.Module:
    """The autoencoder as the authors keep it: float32, resident next to the bf16 DiT."""
    import copy

    return copy.deepcopy(adapter.vae).to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def run_baseline(adapter, records, settings: ExtractSettings, t5, clip, tmp: Path, device, n_txt: int) -> dict:
    """The authors' `eval_spair.py` + `Featurizer4Eval.forward` (ganchaofan0000/DiTF), one image
    at a time with nothing overlapped:

    * text encoders resident on the device, the image's prompt encoded for every image
      (their detailed captions differ per image);
    * the image repeated ensemble-size times and every copy encoded by the float32 VAE
      (``ae.encode(img_tensor)`` on the repeated batch), latents cast to bf16;
    * the DiT through block k IN FULL and the final layer (no early exit: their loop breaks
      after block k, then ``final_layer`` runs), features averaged over the ensemble;
    * features copied to the host and saved per image.
    """
    from ditf_pipeline.extract.extractor import image_seed

    k, t = settings.ks[-1], settings.ts[0]
    out_dir = tmp / "baseline"
    out_dir.mkdir(exist_ok=True)
    dtype = adapter.dtype
    vae = authors_vae(adapter, device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def dit_forward(noisy, prompt):
        with through_block(adapter, k):
            return adapter.forward_intermediates(noisy, prompt, t, [k], stop_early=False)[k]

    def one(record) -> None:
        pixels = preprocess(load_rgb(record.path), settings.img_size)
        with torch.no_grad():
            t5_ids = torch.randint(0, t5.config.vocab_size, (1, n_txt), device=device)
            clip_ids = torch.randint(0, clip.config.vocab_size, (1, 77), device=device)
            embeds = t5(input_ids=t5_ids).last_hidden_state.to(dtype)
            pooled = clip(input_ids=clip_ids).pooler_output.to(dtype)
            prompt = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
            generator = torch.Generator().manual_seed(image_seed(settings.seed, record.key, t))
            image = torch.from_numpy(pixels)[None].expand(settings.ensemble_size, *pixels.shape)
            posterior = vae.encode(image.to(device=device, dtype=torch.float32)).latent_dist
            latents = ((posterior.sample(generator=generator) - shift) * vae.config.scaling_factor).to(dtype)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            block = dit_forward(adapter.add_noise(latents, noise, t), prompt)
        z = block.pre_adaln.float().mean(0).cpu().numpy().astype(np.float16)
        mods = {n: getattr(block.modulation, n).float().mean(0).cpu().numpy() for n in ("shift", "scale", "gate")}
        np.savez(out_dir / f"{record.key.replace('/', '_')}.npz", z=z, **mods)

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as `eval_spair.py` sets it
    try:
        one(records[0])  # warm-up
        _reset_peak(device)
        start = time.perf_counter()
        for record in records[1:]:
            one(record)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        torch.backends.cudnn.benchmark = benchmark
    n = len(records) - 1

    # what one image costs the authors' way (FLOPs): the full blocks through k + final layer, and the VAE x ensemble
    side = settings.img_size // 16
    noisy = torch.randn(settings.ensemble_size, 16, 2 * side, 2 * side, device=device, dtype=dtype)
    prompt = adapter.encode_prompts(["x"])[0]
    with through_block(adapter, k):
        dit_flops = counted_flops(adapter, noisy, prompt, t, k, stop_early=False)
    vae_flops = counted_vae_flops(vae, settings.ensemble_size, settings.img_size, device)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "peak_gpu_gib": _peak_gib(device),
            "flops_per_image_counted": dit_flops + vae_flops, "flops_dit": dit_flops, "flops_vae": vae_flops,
            "cudnn_benchmark": True,
            "recipe": "text encoders resident, prompt encoded per image, fp32 VAE on ensemble copies, "
                      f"DiT through block {k} in full + final layer, one image at a time"}


def counted_vae_flops(vae, batch: int, img: int | tuple[int, int], device) -> int:
    """FLOPs of one VAE encode of `batch` images of img x img (or (height, width)), as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = (img, img) if isinstance(img, int) else img
    counter = FlopCounterMode(display=False)
    pixels = torch.zeros(batch, 3, height, width, device=device, dtype=next(vae.parameters()).dtype)
    with counter, torch.no_grad():
        vae.encode(pixels)
    return int(counter.get_total_flops())


# ---- main ---------------------------------------------------------------------------------------
def _workload(family: str, args, tiny: bool) -> dict:
    if family == "flux":
        return {"config": TINY_FLUX if tiny else FLUX, "img": args.img_size or (64 if tiny else 640), "k": 28, "t": 260,
                "n_txt": 16 if tiny else 512}
    return {"config": TINY_SD35 if tiny else SD35_LARGE, "img": 64 if tiny else 960, "k": 23, "t": 380,
            "n_txt": 16 if tiny else 77 + 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy widths on CPU, for CI (< 1 min)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--images", type=int, default=None, help="timed images per run (default 32; --tiny 4)")
    parser.add_argument("--img-size", type=int, default=None, help="Flux image side (default 640; --tiny 64)")
    parser.add_argument("--ensemble-size", type=int, default=None, help="default 8 (--tiny: 2)")
    parser.add_argument("--models", default="flux,sd3.5", help="comma list of flux, sd3.5")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--batch-images", type=int, default=4, help="images per forward of the lean row (default 4)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the lean row (default inductor; --tiny: aot_eager, no C compiles)")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                        help="attention kernel for the timed runs (auto: PyTorch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results on a GPU)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    tiny = args.tiny
    n_images = args.images or (4 if tiny else 32)
    batch = max(1, args.batch_images)
    n_images = max(n_images, batch)  # the lean row times at least one whole batch
    extractor_module.COMPILE = CompileOptions(backend=args.compile_backend or ("aot_eager" if tiny else "inductor"))
    ensemble = args.ensemble_size or (2 if tiny else 8)
    if device.type == "cuda":
        ceiling = matmul_ceiling(device, DTYPES[dtype], 8192, 50)
    else:
        ceiling = matmul_ceiling(device, DTYPES[dtype], 256 if tiny else 2048, 10 if tiny else 5)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    results = {"device": device_name, "dtype": dtype, "tiny": tiny, "torch": torch.__version__,
               "matmul_ceiling_tflops": ceiling / 1e12, "models": {}}
    print(f"RESULT device={device_name} dtype={dtype} matmul ceiling {ceiling / 1e12:.4g} TFLOP/s")

    sdpa = contextlib.nullcontext()
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.sdpa])

    with tempfile.TemporaryDirectory() as tmp_name, sdpa:
        tmp = Path(tmp_name)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            family = {"flux": "flux", "sd3.5": "sd3"}[name]
            work = _workload(family, args, tiny)
            img = work["img"]
            # square images (scaled 0.9 / 1.0 / 1.1 by the generator): one token grid, so the lean row batches
            root = tmp / "images"
            if not root.exists():
                write_aspect_folder(root, n_images, batch)
            dataset = get_dataset("folder", root)
            by_role: dict[str, list] = {"e": [], "w": [], "t": []}
            for record in dataset.images():
                by_role[record.key.rsplit("/", 1)[-1][0]].append(record)
            settings = ExtractSettings(ks=[work["k"]], ts=[work["t"]], img_size=img, ensemble_size=ensemble,
                                       compile="off", batch_images=1)
            n_txt = work["n_txt"]
            cut = cut_config(family, work["config"], work["k"])
            adapter = build_adapter(family, cut, TINY_VAE if tiny else VAE, device, dtype, n_txt)
            ours = run_ours(adapter, dataset, by_role["e"], by_role["t"], settings, tmp, device)
            lean_settings = replace(settings, compile="on", batch_images=batch)
            lean = run_ours(adapter, dataset, by_role["w"], by_role["t"], lean_settings, tmp, device, label="lean",
                            sync_check=True)
            lean["compile_seconds"] = max(0.0, lean["warm_up_seconds"] - len(by_role["w"]) / ours["images_per_s"])
            # the FLOP floor of one image: what the forward actually runs, x the ensemble, averaged
            # over the timed images' token grids (each aspect ratio counted once, weighted)
            side = img // 16
            prompt = adapter.encode_prompts(["x"])[0]
            counted = vae_once = tokens = 0.0
            for (w, h), share in aspect_shares(by_role["t"]).items():
                pw, ph = model_size(w, h, img, adapter.patch_stride)
                noisy = torch.randn(ensemble, 16, ph // 8, pw // 8, device=device, dtype=adapter.dtype)
                counted += share * counted_flops(adapter, noisy, prompt, work["t"], work["k"])
                # the floor counts the VAE too: one encode of the image (the ensemble's latents can all
                # be drawn from that one posterior), at the VAE's own dtype
                vae_once += share * counted_vae_flops(adapter.vae, 1, (ph, pw), device)
                tokens += share * (ph // 16) * (pw // 16)
            entry = {"img": img, "k": work["k"], "t": work["t"], "ensemble": ensemble,
                     "aspects": {f"{w}x{h}": sum(1 for r in by_role["t"] if r.category == _category(w, h))
                                 for w, h in ASPECTS},
                     "tokens_image_mean": tokens, "tokens_image_square": side * side,
                     "blocks_built": adapter.spec.num_blocks,
                     "tokens_text": n_txt, "width": adapter.spec.hidden_size,
                     "flops_per_image_counted": counted, "ours": ours}
            if family == "flux":
                entry["flops_per_image_analytic"] = sum(
                    share * flux_flops(work["config"], (lambda p: (p[0] // 16) * (p[1] // 16))(model_size(w, h, img, 16)),
                                       n_txt, work["k"], ensemble)["total"]
                    for (w, h), share in aspect_shares(by_role["t"]).items())
            entry["flops_vae_once"] = vae_once
            floor_s = (counted + vae_once) / ceiling
            entry["floor_seconds_per_image"] = floor_s
            entry["ours"]["fraction_of_floor"] = floor_s * ours["images_per_s"]
            lean["fraction_of_floor"] = floor_s * lean["images_per_s"]
            entry["lean"] = lean
            entry["lean_vs_ours"] = lean["images_per_s"] / ours["images_per_s"]
            peak = f"; peak GPU {ours['peak_gpu_gib']:.2f} GiB" if ours["peak_gpu_gib"] is not None else ""
            print(f"RESULT {name} ours: {ours['images_per_s']:.3f} img/s (long side {img}, SPair aspects, "
                  f"{tokens:.0f} image tokens on average, ensemble {ensemble}, k={work['k']}, "
                  f"{adapter.spec.num_blocks} blocks d={adapter.spec.hidden_size}){peak}; "
                  f"{counted / 1e12:.4g} TFLOP/image; floor {1 / floor_s:.3f} img/s; "
                  f"fraction of floor {entry['ours']['fraction_of_floor']:.3f}")
            peak = f"; peak GPU {lean['peak_gpu_gib']:.2f} GiB" if lean["peak_gpu_gib"] is not None else ""
            syncs = f"; host syncs flagged {lean['host_syncs_flagged']}" if "host_syncs_flagged" in lean else ""
            print(f"RESULT {name} lean (compile {extractor_module.COMPILE.backend}, {batch} images/forward): "
                  f"{lean['images_per_s']:.3f} img/s{peak}{syncs}; fraction of floor {lean['fraction_of_floor']:.3f}; "
                  f"lean/ours = {entry['lean_vs_ours']:.2f}x")
            if "flops_per_image_analytic" in entry:
                print(f"RESULT {name} flops analytic/counted = {entry['flops_per_image_analytic'] / counted:.4f}")
            if family == "flux" and not args.no_baseline:
                del adapter  # the authors keep the whole model resident: built anew, uncut
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                adapter = build_adapter(family, work["config"], TINY_VAE if tiny else VAE, device, dtype, n_txt)
                t5, clip = build_text_encoders(device, DTYPES[dtype], tiny)
                base = run_baseline(adapter, by_role["e"] + by_role["t"], settings, t5, clip, tmp, device, n_txt)
                del t5, clip
                print(f"RESULT {name} baseline FLOPs per image: {base['flops_per_image_counted'] / 1e12:.4g} TFLOP "
                      f"(DiT through block {work['k']} + final layer {base['flops_dit'] / 1e12:.4g}, "
                      f"fp32 VAE x{ensemble} {base['flops_vae'] / 1e12:.4g})")
                base["fraction_of_floor"] = floor_s * base["images_per_s"]
                entry["baseline"] = base
                entry["speedup_vs_baseline"] = ours["images_per_s"] / base["images_per_s"]
                entry["lean_vs_baseline"] = lean["images_per_s"] / base["images_per_s"]
                peak = f"; peak GPU {base['peak_gpu_gib']:.2f} GiB" if base["peak_gpu_gib"] is not None else ""
                print(f"RESULT {name} baseline (authors' style): {base['images_per_s']:.3f} img/s{peak}; "
                      f"fraction of floor {base['fraction_of_floor']:.3f}; ours/baseline = {entry['speedup_vs_baseline']:.2f}x; "
                      f"lean/baseline = {entry['lean_vs_baseline']:.2f}x")
            results["models"][name] = entry
            del adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()

    results["peak_host_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = args.out or (Path(__file__).resolve().parent / "results" if device.type == "cuda" else None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() + ("-tiny" if tiny else "")
        (out / f"extract_gpu-{slug}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / f"extract_gpu-{slug}.md").write_text(render_markdown(results), encoding="utf-8")
        print(f"RESULT written to {out / f'extract_gpu-{slug}.json'} and .md")


def render_markdown(results: dict) -> str:
    lines = [f"# Extraction throughput on {results['device']} ({results['dtype']}, torch {results['torch']})", "",
             f"bf16 matmul ceiling measured in the same run: {results['matmul_ceiling_tflops']:.1f} TFLOP/s", "",
             "| model | image | ensemble | k | run | img/s | peak GPU GiB | fraction of FLOP floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in results["models"].items():
        for run in ("ours", "lean", "baseline"):
            if run in entry:
                r = entry[run]
                peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
                lines.append(f"| {name} | {entry['img']} | {entry['ensemble']} | {entry['k']} | {run} | "
                             f"{r['images_per_s']:.3f} | {peak} | {r['fraction_of_floor']:.3f} |")
        if "speedup_vs_baseline" in entry:
            lines.append(f"\n{name}: ours / baseline = {entry['speedup_vs_baseline']:.2f}x; "
                         f"lean / baseline = {entry['lean_vs_baseline']:.2f}x; lean / ours = {entry['lean_vs_ours']:.2f}x; "
                         f"FLOP floor {1 / entry['floor_seconds_per_image']:.2f} img/s "
                         f"({(entry['flops_per_image_counted'] + entry.get('flops_vae_once', 0)) / 1e12:.1f} TFLOP per image, "
                         f"VAE included)\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
