"""Extraction throughput and peak memory, through the real `Extractor` into a real store.

    python benchmarks/bench_extract.py                       # tiny-flux on CPU (seconds)
    python benchmarks/bench_extract.py --model tiny-sd3 --images 24
    python benchmarks/bench_extract.py --arch full --device cuda --dtype bf16   # on a GPU
    python benchmarks/bench_extract.py --compile on --batch-images 4 --json out.json   # the lean path

`--compile` / `--batch-images` are `ditf extract`'s options; the warm-up is one whole batch of
images (so every compile stays out of the timing) and --images counts the timed ones.

`--arch full` swaps the tiny transformer for the full-size architecture of the model's family
(Flux: 19+38 blocks, d=3072; SD3.5-large: 38 blocks, d=2432) with random weights, which cost
exactly what real weights cost. The VAE and text encoders stay tiny (prompts are encoded once
and cached; the VAE is a small share of the work), so the figure is the DiT-bound throughput.
Images are the demo generator's, resized to --img-size on the long side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_spair_demo  # noqa: E402
import ditf_pipeline.extract.extractor as extractor_module  # noqa: E402
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings  # noqa: E402
from ditf_pipeline.models.base import CompileOptions  # noqa: E402
from ditf_pipeline.models import DTYPES, get_spec, load_adapter, resolve_device  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

FULL_SIZE = {
    "flux": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}


def build_adapter(args):
    spec = get_spec(args.model)
    adapter = load_adapter(args.model, dtype=args.dtype, device=args.device)
    if args.arch == "full":
        if spec.family not in FULL_SIZE or not spec.tiny:
            raise SystemExit(f"--arch full needs a tiny model of a family in {sorted(FULL_SIZE)}")
        config = FULL_SIZE[spec.family]
        # full-size transformer; prompts are random embeddings of the real widths (encoded once
        # and cached in real runs, so the text side is not what this measures)
        options = dict(spec.options, tiny_config=config, num_double=config["num_layers"])
        adapter.spec = replace(spec, num_blocks=config["num_layers"] + config["num_single_layers"],
                               hidden_size=config["num_attention_heads"] * config["attention_head_dim"], options=options)
        adapter.encode_prompts = lambda prompts: [
            {"prompt_embeds": torch.randn(512, config["joint_attention_dim"]),
             "pooled_prompt_embeds": torch.randn(config["pooled_projection_dim"])} for _ in prompts
        ]
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--arch", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--ensemble-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--k", type=int, action="append")
    parser.add_argument("--t", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--batch-images", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    extractor_module.COMPILE = CompileOptions(backend=args.compile_backend)
    args.device = str(resolve_device(args.device))

    adapter = build_adapter(args)
    spec = adapter.spec
    img_size = args.img_size or (640 if args.arch == "full" else spec.img_size)
    ks = args.k or [spec.default_k if args.arch == "tiny" else 28]
    with tempfile.TemporaryDirectory() as tmp:
        warmup = max(1, args.batch_images)
        per_category = (args.images + warmup + 1) // 2  # the generator makes n images for n(n-1)/2 >= pairs
        pairs = max(1, per_category * (per_category - 1) // 2)
        # one aspect ratio (the generator scales by 0.9 / 1.0 / 1.1): one token grid, so batches fill
        root = make_spair_demo(Path(tmp) / "data", categories=("cat", "car"), pairs_per_category=pairs,
                               image_size=(img_size, img_size * 3 // 4))
        dataset = get_dataset("spair", root, "test")
        records = dataset.images()[: args.images + warmup]
        settings = ExtractSettings(ks=ks, ts=[args.t or spec.default_t], img_size=img_size,
                                   ensemble_size=args.ensemble_size, batch_size=args.batch_size,
                                   compile=args.compile, batch_images=args.batch_images)
        extractor = Extractor(adapter, FeatureStore(Path(tmp) / "bench.zarr"), settings)
        # warm-up on one batch (model build, allocator, kernels, compiles) kept out of the timing
        extractor.run(dataset, progress=False, records=records[:warmup])
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        report = extractor.run(dataset, progress=False, records=records[warmup:])
        cpu = time.process_time() - cpu_start  # all threads of the process: fairer than wall time on a shared machine
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = (
        f"model={spec.name} arch={args.arch} blocks={spec.num_blocks} width={spec.hidden_size} k={ks} "
        f"img={img_size} ensemble={args.ensemble_size} dtype={args.dtype} device={args.device} "
        f"compile={args.compile}{'/' + args.compile_backend if args.compile != 'off' else ''} "
        f"batch_images={args.batch_images}: "
        f"{report.extracted} images in {seconds:.2f} s = {report.extracted / seconds:.2f} img/s "
        f"({cpu / report.extracted * 1000:.0f} ms CPU per image); "
        f"peak host RSS {peak_rss:.0f} MiB"
    )
    if adapter.device.type == "cuda":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})"
    print(line)
    if args.json is not None:
        result = {"model": spec.name, "arch": args.arch, "k": ks, "img": img_size, "ensemble": args.ensemble_size,
                  "dtype": args.dtype, "device": args.device, "compile": args.compile,
                  "compile_backend": args.compile_backend if args.compile != "off" else None,
                  "batch_images": args.batch_images, "images": report.extracted, "wall_s": seconds,
                  "cpu_ms_per_image": cpu / report.extracted * 1000, "images_per_s": report.extracted / seconds,
                  "torch_threads": torch.get_num_threads(), "peak_rss_mib": peak_rss}
        with args.json.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
