"""Peak resident memory of `ditf extract` against the deepest block k (CPU, no GPU needed).

    python benchmarks/load_memory.py                      # width 256, k = 0, 28, 56, fp32 and bf16
    python benchmarks/load_memory.py --width 512 --ks 0 56

Writes a pipeline folder with FLUX.1's block layout (19 double + 38 single blocks) at a reduced
width (random weights, tiny text encoders and VAE) to a temporary folder, then runs
`ditf extract --model flux --weights DIR --k K --device cpu` in a fresh process per (k, dtype) on
a generated SPair-layout set (4 images of 64 px, ensemble 1) and reads each child's peak RSS
(`os.wait4`). Only the transformer's blocks up to k are loaded, so memory grows with k (a full
load would read all 57 blocks). Prints one RESULT line per run and a markdown table.

This process imports nothing heavy before the runs and builds the folder in a child: a forked
child's peak RSS starts at its parent's RSS, which would otherwise hide the differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def flux_layout_folder(directory: Path, width: int) -> int:
    """Save a 19 + 38 block Flux pipeline of `width` (head dim 128, as FLUX.1); returns its parameter count."""
    from ditf_pipeline.models import _REGISTRY, get_spec

    spec = get_spec("tiny-flux")
    config = dict(spec.options["tiny_config"], num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=width // 128, axes_dims_rope=(16, 56, 56))
    adapter = _REGISTRY["tiny-flux"][1](dataclasses.replace(spec, options=dict(spec.options, tiny_config=config)))
    adapter.save_pipeline(directory)
    return sum(p.numel() for p in adapter._tiny()["transformer"].parameters())


def truncated_parameters(width: int, k: int) -> int:
    """Parameters of the transformer cut after block k, counted on the meta device."""
    import torch
    from diffusers import FluxTransformer2DModel

    from ditf_pipeline.models import get_spec

    config = dict(get_spec("tiny-flux").options["tiny_config"], num_layers=19, num_single_layers=38,
                  attention_head_dim=128, num_attention_heads=width // 128, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model.transformer_blocks = model.transformer_blocks[: min(k + 1, 19)]
    model.single_transformer_blocks = model.single_transformer_blocks[: max(k + 1 - 19, 0)]
    return sum(p.numel() for p in model.parameters())


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit code) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(stderr[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="transformer width (a multiple of 128)")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 28, 56])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)  # child: write the folder and data
    args = parser.parse_args()
    if args.save is not None:
        from ditf_pipeline.demo import make_spair_demo

        make_spair_demo(args.save / "SPair", pairs_per_category=1, image_size=(64, 64))
        print(flux_layout_folder(args.save / "weights", args.width))  # last line: the parameter count
        return

    with tempfile.TemporaryDirectory(prefix="ditf-load-memory-") as tmp_name:
        tmp = Path(tmp_name)
        made = subprocess.run([sys.executable, __file__, "--width", str(args.width), "--save", str(tmp)],
                              capture_output=True, text=True, check=True)
        total = int(made.stdout.split()[-1])
        data = tmp / "SPair"
        rows = []
        for dtype in args.dtypes:
            for k in args.ks:
                command = [sys.executable, "-m", "ditf_cli.main", "extract", "--model", "flux", "--weights", str(tmp / "weights"),
                           "--dataset", "spair", "--data-root", str(data), "--store", str(tmp / f"s-{dtype}-{k}.zarr"),
                           "--k", str(k), "--t", "260", "--img-size", "64", "--ensemble-size", "1", "--dtype", dtype,
                           "--device", "cpu", "--no-progress"]
                rss, seconds, code = peak_rss(command)
                rows.append((dtype, k, rss, seconds, code))
                print(f"RESULT width={args.width} dtype={dtype} k={k} peak_rss={rss:.0f} MiB seconds={seconds:.1f} "
                      f"exit={code}", flush=True)
    print(f"\nFlux layout 19+38 blocks, width {args.width}, {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}\n")
    print("| dtype | k | transformer parameters loaded | peak RSS of `ditf extract` |")
    print("| --- | --- | --- | --- |")
    for dtype, k, rss, _, code in rows:
        params = truncated_parameters(args.width, k)
        print(f"| {dtype} | {k} | {params / 1e6:.1f}M of {total / 1e6:.1f}M | {rss:.0f} MiB{'' if code == 0 else ' (failed)'} |")


if __name__ == "__main__":
    main()
