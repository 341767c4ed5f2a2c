"""Check that the Docker image's Python dependencies use ONE CUDA major version.

PyPI's `torch==2.13.0` for Linux brings the CUDA 13 user-space libraries, while FAISS-GPU wheels
are built for CUDA 12; an image with both carries two CUDA stacks (gigabytes, and two sets of
driver requirements). This script resolves exactly what `docker/Dockerfile` installs (its
`TORCH` and `EXTRAS` build arguments, the project's dependencies and `constraints.txt`) with
`pip install --dry-run --report` for Linux x86_64 / CPython 3.11, which reads package metadata
only (no build, no wheel download), and fails if two CUDA majors appear.

    python docker/cuda_stack.py                     # the image as the Dockerfile builds it
    python docker/cuda_stack.py --torch torch==2.9.1 --extras faiss-gpu-cu12   # another combination

Exit status: 0 one (or no) CUDA major, 1 several, 2 the resolution itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: manylinux tags pip must accept for a Linux x86_64 image (pip matches tags exactly)
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64", "linux_x86_64"] + [
    f"manylinux_2_{minor}_x86_64" for minor in (5, 12, 17, 18, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39)
]
#: CUDA 13 wheels dropped the `-cuXX` suffix; for these packages the version's major IS the CUDA major
VERSIONED_LIKE_CUDA = {
    "cuda-toolkit", "cuda-bindings", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-cuda-cupti",
    "nvidia-nvtx", "nvidia-nvjitlink", "nvidia-cublas",
}
#: lines of constraints.txt the image does not take (the Dockerfile filters the same way)
SKIPPED_CONSTRAINTS = re.compile(r"^(torch|triton|nvidia-|faiss|ditf|#)", re.IGNORECASE)


def dockerfile_args(path: Path) -> dict[str, str]:
    """`ARG NAME=default` values of a Dockerfile (quotes stripped)."""
    args = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*ARG\s+(\w+)=(.*)$", line)
        if match:
            args[match.group(1)] = match.group(2).strip().strip('"').strip("'")
    return args


def image_requirements(pyproject: Path, torch: str, extras: list[str]) -> list[str]:
    """What the image installs: torch, the project's dependencies and the chosen extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = [torch] + [d for d in project["dependencies"] if not d.lower().startswith("torch")]
    for extra in extras:
        requirements += optional[extra]
    return requirements


def cuda_major(name: str, version: str) -> int | None:
    """The CUDA major a distribution belongs to, or None if it is not a CUDA package."""
    name = re.sub(r"[-_.]+", "-", name).lower()
    suffix = re.search(r"-cu(\d+)$", name)
    if suffix:
        major = suffix.group(1)
        return int(major[:2]) if len(major) > 2 else int(major)  # cu12, cu13, cu126 -> 12
    local = re.search(r"\+cu(\d{2,3})$", version)  # e.g. torch 2.9.1+cu126 from a PyTorch index
    if local:
        return int(local.group(1)[:2])
    if name in VERSIONED_LIKE_CUDA:
        return int(version.split(".")[0])
    return None


def cuda_majors(installs: list[tuple[str, str]]) -> dict[int, list[str]]:
    """CUDA major -> the distributions that need it."""
    found: dict[int, list[str]] = {}
    for name, version in installs:
        major = cuda_major(name, version)
        if major is not None:
            found.setdefault(major, []).append(f"{name}=={version}")
    return found


def resolve(requirements: list[str], constraints: Path) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for the image, from metadata only."""
    env = dict(os.environ)
    # this machine's own pip configuration (local wheel folders, CPU-only torch) must not leak in
    env["PIP_CONFIG_FILE"] = os.devnull
    for name in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            "--target", str(Path(tmp) / "target"), "-c", str(constraints),
            *[arg for platform in PLATFORMS for arg in ("--platform", platform)], *requirements,
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not report.exists():
            sys.stderr.write(result.stderr[-4000:])
            raise SystemExit(2)
        data = json.loads(report.read_text())
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in data["install"]]


def main(argv: list[str] | None = None) -> int:
    defaults = dockerfile_args(ROOT / "docker" / "Dockerfile")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default=defaults.get("TORCH", "torch"), help="torch requirement (Dockerfile ARG TORCH)")
    parser.add_argument("--extras", default=defaults.get("EXTRAS", ""), help="comma-separated extras (Dockerfile ARG EXTRAS)")
    args = parser.parse_args(argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        lines = (ROOT / "constraints.txt").read_text().splitlines()
        constraints.write_text("\n".join(line for line in lines if line.strip() and not SKIPPED_CONSTRAINTS.match(line)) + "\n")
        installs = resolve(image_requirements(ROOT / "pyproject.toml", args.torch, extras), constraints)
    majors = cuda_majors(installs)
    label = f"{args.torch}" + (f" + [{','.join(extras)}]" if extras else "")
    if len(majors) > 1:
        print(f"error: the image ({label}) mixes CUDA majors:", file=sys.stderr)
        for major, names in sorted(majors.items()):
            print(f"  CUDA {major}: {', '.join(sorted(names))}", file=sys.stderr)
        return 1
    which = f"CUDA {next(iter(majors))}" if majors else "no CUDA libraries"
    print(f"ok: the image ({label}) resolves to {len(installs)} distributions with one CUDA stack: {which}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
