"""The Docker image's one-CUDA-stack check (docker/cuda_stack.py), offline parts.

CI also runs the script itself, which resolves the image's real dependencies from the package
registry; these tests pin down the classification it relies on, with the names the real CUDA 12
and CUDA 13 wheels carry (CUDA 13 wheels dropped the -cuXX suffix).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cuda_stack", ROOT / "docker" / "cuda_stack.py")
cuda_stack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_stack)

#: what PyPI's torch 2.13.0 and faiss-gpu-cu12 resolve to (seen 2026-11-30)
TORCH_213 = [("torch", "2.13.0"), ("cuda-toolkit", "13.0.3.0"), ("nvidia-cublas", "13.1.1.3"),
             ("nvidia-cudnn-cu13", "9.20.0.48"), ("nvidia-nccl-cu13", "2.29.7"), ("nvidia-cufft", "12.0.0.61"),
             ("numpy", "2.4.6")]
FAISS_CU12 = [("faiss-gpu-cu12", "1.14.1.post1"), ("nvidia-cuda-runtime-cu12", "12.9.79"), ("nvidia-cublas-cu12", "12.9.3.13")]


@pytest.mark.parametrize("name, version, major", [
    ("nvidia-cublas-cu12", "12.9.3.13", 12), ("nvidia_cudnn_cu13", "9.20.0.48", 13), ("cuda-toolkit", "13.0.3.0", 13),
    ("nvidia-cuda-runtime", "13.0.96", 13), ("torch", "2.9.1+cu126", 12), ("torch", "2.13.0", None),
    ("nvidia-cufft", "12.0.0.61", None),  # CUDA 13's cuFFT is version 12: not a CUDA major
    ("numpy", "2.4.6", None),
])
def test_cuda_major_of_a_distribution(name, version, major):
    assert cuda_stack.cuda_major(name, version) == major


def test_torch_alone_is_one_stack_and_faiss_gpu_makes_two():
    assert set(cuda_stack.cuda_majors(TORCH_213)) == {13}
    mixed = cuda_stack.cuda_majors(TORCH_213 + FAISS_CU12)
    assert set(mixed) == {12, 13}
    assert "faiss-gpu-cu12==1.14.1.post1" in mixed[12]


def test_the_image_installs_what_the_dockerfile_says():
    args = cuda_stack.dockerfile_args(ROOT / "docker" / "Dockerfile")
    assert args["TORCH"] == "torch==2.13.0"
    assert args["EXTRAS"] == ""  # no FAISS-GPU (CUDA 12) next to torch's CUDA 13
    requirements = cuda_stack.image_requirements(ROOT / "pyproject.toml", args["TORCH"], [])
    assert requirements[0] == "torch==2.13.0"
    assert not any(r.lower().startswith("faiss") for r in requirements)
    assert "faiss-gpu-cu12>=1.8" in cuda_stack.image_requirements(ROOT / "pyproject.toml", "torch", ["faiss-gpu-cu12"])
    with pytest.raises(SystemExit, match="unknown extra"):
        cuda_stack.image_requirements(ROOT / "pyproject.toml", "torch", ["gpu-typo"])
