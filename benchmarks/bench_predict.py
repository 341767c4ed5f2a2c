"""The match stage end to end (`predict`: store reads, feature variants, caches, worker threads,
prediction writes) on a synthetic SPair-71k-shaped store: CPU per pair, wall clock for 1 and 2
(or more) jobs, peak RSS, for every feature variant.

The store holds `--images` random float16 Flux-sized maps (40x30 / 30x40 x 3072, two massive
channels) with AdaLN vectors; pairs are drawn within 18 categories as in SPair's test split
(12,234 pairs over 481 images at --scale 1). Each (variant, jobs) run is a fresh process, so
its peak RSS is its own; the store is built once and reused (--store).

Memory with several jobs (worker processes): `peak_rss_mib` is the calling process's own peak,
`worker_peak_rss_mib` the largest worker's (both exact, from getrusage), and `tree_peak_rss_mib`
/ `tree_peak_pss_mib` the peak of their sum over the process and its workers, sampled every
second from /proc (Linux; a sample costs ~2 ms of CPU per process read, so sampling more often
would tax the 2-job runs, whose cores are both busy, more than the 1-job ones). RSS counts the
shared libraries (torch) once per process; PSS splits shared pages between the processes that
map them, so the PSS sum is the memory the run takes.

    python benchmarks/bench_predict.py [--scale 0.25] [--jobs 1,2] [--variants raw,adaln+cd] [--ceiling] [--json PATH]

`--process` measures instead the whole `ditf match` command as a user runs it: a synthetic
SPair-layout dataset (pair JSONs) and store (default --scale 0.25: ~120 images, ~3,000 pairs,
3072 channels float16, 18 categories) on disk, `ditf match -v VARIANT --jobs N --overwrite` run
as a subprocess, its CPU seconds from the child's rusage (its worker processes included) minus
those of a start-up run (the same command once the predictions are done: interpreter, imports,
dataset parsing, checks, nothing to match; the median of three). One untimed run per code and
variant comes first: numba compiles the CPU kernels on a first run (~2 s) and loads them from its
disk cache after, wall clock for each --jobs, and the peak RSS of
the largest process (one worker). Reads, checksums, channel detection and variants count.

    python benchmarks/bench_predict.py --process [--scale 0.25] [--jobs 1,2] [--variants raw,adaln+cd] [--repeat 3] [--json PATH]

`--ceiling` also runs, per variant, two independent one-job processes at the same time, each on
one contiguous half of the pairs: the best a 2-job run could do on this machine (nothing
shared, no start-up, no tail), so the 1 -> 2 jobs speed-up can be read against it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_PAIRS, N_IMAGES, N_CATEGORIES, CHANNELS = 12_234, 481, 18, 3072
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((30, 40), (500, 333)), ((40, 30), (333, 500))]
MASSIVE = (154, 1446)
VARIANTS = ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"]


class SyntheticPairs:
    """Just what `predict` reads from a dataset: name, task, root and the pairs."""

    task = "pairs"

    def __init__(self, scale: float, seed: int = 0) -> None:
        from ditf_pipeline.datasets.base import Pair

        self.name, self.root, self.split = "spair", Path("synthetic"), "test"
        rng = np.random.default_rng(seed)
        n_images, n_pairs = max(N_CATEGORIES * 2, round(N_IMAGES * scale)), max(1, round(N_PAIRS * scale))
        self.images = []
        for i in range(n_images):
            grid, size = SHAPES[int(rng.integers(len(SHAPES)))]
            self.images.append({"key": f"c{i * N_CATEGORIES // n_images}/img{i}", "grid": grid, "size": size,
                                "category": i * N_CATEGORIES // n_images})
        by_category = [[i for i, im in enumerate(self.images) if im["category"] == c] for c in range(N_CATEGORIES)]
        self._pairs = []
        for p in range(n_pairs):
            src, trg = rng.choice(by_category[p * N_CATEGORIES // n_pairs], 2, replace=False)
            s, t = self.images[src], self.images[trg]
            n = int(rng.integers(6, 15))
            kps = np.stack([rng.integers(0, s["size"][0], n), rng.integers(0, s["size"][1], n)], 1).astype(float)
            truth = np.stack([rng.integers(0, t["size"][0], n), rng.integers(0, t["size"][1], n)], 1).astype(float)
            self._pairs.append(Pair(f"{p:06d}", f"c{s['category']}", s["key"], t["key"], kps, truth, s["size"], t["size"], 200.0))

    def pairs(self):
        return self._pairs


def build_store(path: Path, data: SyntheticPairs, model: str = "synthetic") -> None:
    from ditf_pipeline.store.feature_store import FeatureStore

    store = FeatureStore(path)
    rows = store.register_images(data.name, [im["key"] for im in data.images], [im["size"] for im in data.images])
    arrays = store.open_features(data.name, model, 28, 260, config={"model": model}, n_images=len(rows),
                                 grid_max=(40, 40), hidden_size=CHANNELS,
                                 modulation_names=["shift_t", "scale_t", "gate_t", "shift_c", "scale_c", "gate_c"])
    complete = arrays.complete()
    rng = np.random.default_rng(1)
    for im in data.images:
        row = rows[im["key"]]
        if complete[row]:
            continue
        z = rng.standard_normal((*im["grid"], CHANNELS), dtype=np.float32)
        for channel in MASSIVE:
            z[..., channel] *= 300
        vectors = {name: (0.1 * rng.standard_normal(CHANNELS)).astype(np.float32) for name in arrays.modulation_names}
        arrays.write_image(row, z.astype(np.float16), vectors)


class TreeMemory(threading.Thread):
    """Peak summed RSS and PSS (MiB) of this process and its children, sampled from /proc."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval, self.stopped = interval, threading.Event()
        self.peak_rss = self.peak_pss = 0.0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    def sample(self) -> None:
        rss = pss = 0
        for pid in [os.getpid(), *self._children(os.getpid())]:
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue  # a worker that just ended
            fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
            rss += int(fields["Rss"].split()[0])
            pss += int(fields["Pss"].split()[0])
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss / 1024), max(self.peak_pss, pss / 1024)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def __enter__(self) -> "TreeMemory":
        if Path("/proc/self/smaps_rollup").exists():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()
            self.sample()


def run_one(store_path: Path, scale: float, variant: str, jobs: int, protocol: str, half: int | None = None) -> dict:
    """One match run in this process (called in a fresh subprocess by `main`); with `half` (0 or
    1), only that contiguous half of the pairs."""
    from ditf_pipeline.match.pool import limit_malloc_arenas
    from ditf_pipeline.match.predict import MatchSettings, predict
    from ditf_pipeline.store.feature_store import FeatureStore

    limit_malloc_arenas()  # as `ditf` does
    data = SyntheticPairs(scale)
    if half is not None:
        middle = len(data.pairs()) // 2
        data._pairs = data._pairs[:middle] if half == 0 else data._pairs[middle:]
    store = FeatureStore(store_path)
    arrays = store.open_features(data.name, "synthetic", 28, 260)
    arrays.group.attrs.pop("massive_channels", None)  # every run detects (and stores) them itself
    settings = MatchSettings(variant=variant, protocol=protocol, jobs=jobs)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    with TreeMemory() as memory:
        report = predict(store, data, "synthetic", 28, 260, settings, overwrite=True, progress=False)
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    return {"variant": variant, "protocol": protocol, "jobs": jobs, "workers": report.workers, "pairs": report.matched,
            "channels": report.channels,
            "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_pair": 1000 * cpu / report.matched,
            "wall_ms_per_pair": 1000 * wall / report.matched,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "tree_peak_rss_mib": memory.peak_rss or None, "tree_peak_pss_mib": memory.peak_pss or None}


def _cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_spair_layout(root: Path, data: SyntheticPairs) -> None:
    """`data` as an SPair-71k test split on disk (pair JSONs only: matching reads no image)."""
    folder = root / "PairAnnotation" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for pair in data.pairs():
        category, src, trg = pair.category, pair.src_key.split("/")[1], pair.trg_key.split("/")[1]
        width, height = pair.trg_size
        record = {"category": category, "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg",
                  "src_imsize": [*pair.src_size, 3], "trg_imsize": [width, height, 3],
                  "trg_bndbox": [0, 0, width - 1, height - 1],
                  "src_kps": pair.src_kps.astype(int).tolist(), "trg_kps": pair.trg_kps.astype(int).tolist()}
        (folder / f"{pair.pair_id}-{src}-{trg}:{category}.json").write_text(json.dumps(record))


def run_process(command: list[str], code: Path | None = None) -> dict:
    """One `ditf` command as a child process: its CPU seconds (with its waited-for worker
    processes: Linux's wait4 reports both), wall seconds and largest RSS of any of them. With
    `code`, the `ditf_pipeline` package is imported from that folder (an older checkout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    # run from the file system root: a `python -c` worker would otherwise find ./ditf_pipeline first
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    err = process.stderr.read().decode()
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def process_mode(args, data: SyntheticPairs, store: Path, root: Path) -> dict:
    """`--process`: the whole `ditf match` per (variant, jobs), start-up subtracted."""
    from ditf_pipeline.store.feature_store import FeatureStore

    write_spair_layout(root, data)
    script = Path(sys.executable).with_name("ditf")  # the installed command, as a user runs it
    ditf = [str(script)] if script.exists() and not args.module else [sys.executable, "-m", "ditf_cli.main"]
    # with --baseline, each measurement runs the older code and this one back to back, so that
    # both see the same load of a shared machine
    codes = [("baseline", args.baseline), ("this", None)] if args.baseline else [("this", None)]
    runs, speedups = [], {}
    predictions = {}
    warmed: set[tuple[str, str]] = set()
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        for jobs in [int(j) for j in args.jobs.split(",")]:
            for name, code in codes:
                command = [*ditf, "match", "-m", "flux", "-d", "spair", "--data-root", str(root), "-s", str(store),
                           "--k", "28", "--t", "260", "-v", variant, "--jobs", str(jobs), "--device", "cpu", "-q"]

                def full_run() -> dict:
                    with FeatureStore(store) as opened:  # every run detects (and stores) the channels itself
                        opened.open_features(data.name, "flux", 28, 260).group.attrs.pop("massive_channels", None)
                    return run_process([*command, "--overwrite"], code)

                if (name, variant) not in warmed:  # numba compiles the CPU kernels once, then loads them from its disk cache
                    full_run()
                    warmed.add((name, variant))
                # the median of --repeat runs (CPU and wall each): one run on this VM varies by ~10 %
                fulls = [full_run() for _ in range(args.repeat)]
                full = {"cpu_s": float(np.median([r["cpu_s"] for r in fulls])),
                        "wall_s": float(np.median([r["wall_s"] for r in fulls])),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in fulls),
                        "wall_s_runs": [r["wall_s"] for r in fulls], "cpu_s_runs": [r["cpu_s"] for r in fulls]}
                # everything is done: start-up, parsing and checks only; the median of three, as one
                # start-up varies by ~0.5 s on this VM (0.15 ms per pair at this scale)
                startups = sorted((run_process(command, code) for _ in range(3)), key=lambda r: r["cpu_s"])
                startup = {"cpu_s": startups[1]["cpu_s"], "wall_s": sorted(r["wall_s"] for r in startups)[1]}
                with FeatureStore(store) as opened:
                    from ditf_pipeline.core.settings import MatchSettings

                    read = opened.open_predictions((data.name, "flux", 28, 260), MatchSettings(variant=variant).name).read()
                same = predictions.setdefault(variant, read).keys() == read.keys() and all(
                    np.array_equal(predictions[variant][key], value, equal_nan=True) for key, value in read.items())
                pairs = len(data.pairs())
                run = {"code": name, "variant": variant, "jobs": jobs, "pairs": pairs, **full,
                       "startup_cpu_s": startup["cpu_s"], "startup_wall_s": startup["wall_s"],
                       "cpu_ms_per_pair": 1000 * (full["cpu_s"] - startup["cpu_s"]) / pairs,
                       "wall_ms_per_pair": 1000 * (full["wall_s"] - startup["wall_s"]) / pairs,
                       "predictions_equal_first_run": same}
                runs.append(run)
                print(f"{name:8s} {variant:10s} jobs={jobs}: {run['cpu_ms_per_pair']:.2f} ms CPU/pair (start-up "
                      f"{startup['cpu_s']:.1f} s excluded), {full['wall_s']:.1f} s wall, largest process "
                      f"{full['peak_rss_mib']:.0f} MiB, predictions equal to the first run: {same}")
        for name, _ in codes:
            by_jobs = {r["jobs"]: r["wall_s"] - r["startup_wall_s"] for r in runs
                       if r["variant"] == variant and r["code"] == name}
            if 1 in by_jobs and 2 in by_jobs:
                speedups[f"{name} {variant}"] = by_jobs[1] / by_jobs[2]
                print(f"{name:8s} {variant:10s} wall-clock speed-up 1 -> 2 jobs (start-up excluded): "
                      f"{speedups[f'{name} {variant}']:.2f}x")
    return {"mode": "process", "baseline": str(args.baseline) if args.baseline else None, "runs": runs,
            "speedup_1_to_2_jobs": speedups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SPair's 481 images / 12,234 pairs")
    parser.add_argument("--jobs", default="1,2", help="comma list of job counts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--protocol", default="dift")
    parser.add_argument("--store", type=Path, default=None, help="store to build/reuse (default: a temporary one)")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ceiling", action="store_true", help="also two independent 1-job halves at once")
    parser.add_argument("--process", action="store_true", help="the whole `ditf match` process (see above)")
    parser.add_argument("--module", action="store_true", help="--process: run `python -m ditf_cli.main`, not `ditf`")
    parser.add_argument("--repeat", type=int, default=1, help="--process: timed runs per (variant, jobs, code), the median kept")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="--process: also run the ditf_pipeline package of this folder (an older checkout), side by side")
    parser.add_argument("--one", nargs=3, metavar=("STORE", "VARIANT", "JOBS"), help=argparse.SUPPRESS)
    parser.add_argument("--half", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run = run_one(Path(args.one[0]), args.scale, args.one[1], int(args.one[2]), args.protocol, args.half)
        print("RUN " + json.dumps(run))
        return

    if args.process and "--scale" not in sys.argv:
        args.scale = 0.25  # the SPair-size store: ~120 images, ~3,000 pairs
    data = SyntheticPairs(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "bench.zarr"
        start = time.perf_counter()
        build_store(store, data, model="flux" if args.process else "synthetic")
        print(f"store: {len(data.images)} images, {len(data.pairs())} pairs ({time.perf_counter() - start:.0f} s to build)")
        if args.process:
            result = {"machine": args.machine, "date": datetime.date.today().isoformat(), "scale": args.scale,
                      "images": len(data.images), "pairs": len(data.pairs()), "protocol": "dift", "repeat": args.repeat,
                      "load_average_at_start": list(os.getloadavg()),
                      **process_mode(args, data, store, Path(tmp) / "SPair-71k"),
                      "load_average_at_end": list(os.getloadavg())}
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
            return
        runs, ceilings = [], {}
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}

        def start(variant: str, jobs: int, half: int | None = None) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, __file__, "--scale", str(args.scale), "--protocol", args.protocol,
                                     "--one", str(store), variant, str(jobs),
                                     *([] if half is None else ["--half", str(half)])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

        def finished(process: subprocess.Popen) -> dict:
            out, err = process.communicate()
            if process.returncode != 0:
                raise SystemExit(err[-3000:])
            return json.loads(out.split("RUN ", 1)[1])

        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            for jobs in [int(j) for j in args.jobs.split(",")]:
                run = finished(start(variant, jobs))
                runs.append(run)
                print(f"{variant:14s} jobs={jobs} ({run['workers']} worker(s)): {run['cpu_ms_per_pair']:.2f} ms CPU/pair, {run['wall_s']:.1f} s wall "
                      f"({run['wall_ms_per_pair']:.2f} ms/pair), peak RSS {run['peak_rss_mib']:.0f} MiB "
                      f"(largest worker {run['worker_peak_rss_mib']:.0f}, summed {run['tree_peak_rss_mib'] or 0:.0f}, "
                      f"summed PSS {run['tree_peak_pss_mib'] or 0:.0f}), channels {run['channels']}")
            if args.ceiling:
                halves = [finished(p) for p in [start(variant, 1, 0), start(variant, 1, 1)]]
                ceilings[variant] = {"halves": halves, "wall_s": max(h["wall_s"] for h in halves)}
                print(f"{variant:14s} two independent 1-job halves at once: {ceilings[variant]['wall_s']:.1f} s wall")
        speedups = {}
        for variant in {r["variant"] for r in runs}:
            by_jobs = {r["jobs"]: r["wall_s"] for r in runs if r["variant"] == variant}
            if 1 in by_jobs and 2 in by_jobs:
                speedups[variant] = by_jobs[1] / by_jobs[2]
                print(f"{variant:14s} wall-clock speed-up 1 -> 2 jobs: {speedups[variant]:.2f}x")
            if 1 in by_jobs and variant in ceilings:
                ceilings[variant]["speedup"] = by_jobs[1] / ceilings[variant]["wall_s"]
                print(f"{variant:14s} ceiling (two independent halves): {ceilings[variant]['speedup']:.2f}x")
    result = {"machine": args.machine, "date": datetime.date.today().isoformat(), "scale": args.scale,
              "images": len(data.images), "pairs": len(data.pairs()), "protocol": args.protocol, "runs": runs,
              "speedup_1_to_2_jobs": speedups, "two_independent_halves": ceilings,
              "load_average_at_end": list(os.getloadavg())}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
