"""The Dockerfile and the docker docs only reference files that exist (no Docker daemon here), and the
Dockerfile's base image and GPU packages are ones fastssl works with."""

import os
import re

from conftest import ROOT

# First NGC PyTorch release whose Triton returns tl.atomic_add's result to every thread of a block
# (fastssl/kernels/bank_loss.py, _bank_scan, relies on it): the bug is triton-lang/triton#7402, fixed by #7460
# (merged July 2025, after release/3.4.x was cut: pytorch/pytorch#156890, and still open in 3.4.0 per
# triton-lang/triton#7957), so Triton 3.5.0 is the first release with it; NGC 25.10 is PyTorch 2.9.0a0,
# the series built on Triton 3.5.0 (NVIDIA/TensorRT-LLM requirements.txt for rel-25-10: triton==3.5.0).
FIRST_FIXED_NGC = (25, 10)
# NGC releases from 25.10 on are CUDA 13 (NVIDIA release notes: Triton server 25.10 CUDA 13.0.2, PyTorch 25.12
# CUDA 13.1.0, 26.06 CUDA 13.3.0), so an image that passes the check above needs CUDA 13 packages.
NGC_CUDA_MAJOR = 13
# CUDA major of the FAISS GPU wheels on PyPI (their METADATA "Environment :: GPU :: NVIDIA CUDA" classifier).
FAISS_WHEEL_CUDA = {"faiss-gpu": 12, "faiss-gpu-cu12": 12, "faiss-cuda-cu128": 12, "faiss-cuda==1.14.1.post4": 13}


def _dockerfile() -> str:
    return open(os.path.join(ROOT, "docker", "Dockerfile")).read()


def _pip_installs(text: str) -> list:
    """Package requirements named by the Dockerfile's ``pip install`` lines (options dropped)."""
    pkgs = []
    for line in re.findall(r"^RUN pip install (.+)$", text, re.M):
        pkgs += [w for w in line.split() if not w.startswith("-") and w != "."]
    return pkgs


def _cuda_suffix_major(pkg: str):
    """CUDA major a package's name pins (nvidia-dali-cuda130 -> 13, faiss-gpu-cu12 -> 12), else None."""
    m = re.search(r"-cu(?:da)?(\d{2})\d?\b", pkg)
    return int(m.group(1)) if m else None


def test_dockerfile_copies_existing_paths():
    text = _dockerfile()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", text, re.M)
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *srcs, _dest = line.split()
        for s in srcs:
            assert os.path.exists(os.path.join(ROOT, s)), f"Dockerfile copies missing {s}"
    assert "--no-deps" in text


def test_base_image_has_the_triton_atomic_fix():
    m = re.search(r"^FROM nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3\s*$", _dockerfile(), re.M)
    assert m, "FROM is not an nvcr.io/nvidia/pytorch:YY.MM-py3 image"
    release = (int(m.group(1)), int(m.group(2)))
    assert release >= FIRST_FIXED_NGC, f"NGC {release} ships a Triton without the tl.atomic_add fix"


def test_build_checks_the_image_triton_and_dali_versions():
    text = _dockerfile()
    assert re.search(r"v\(triton\.__version__\) >= \(3, 5\)", text), "no build-time Triton >= 3.5 check"
    assert re.search(r"v\(dali\.__version__\) >= \(2, 2\)", text), "no build-time DALI >= 2.2 check"


def test_gpu_packages_match_the_image_cuda_major():
    pkgs = _pip_installs(_dockerfile())
    faiss = [p for p in pkgs if p.startswith("faiss")]
    assert len(faiss) == 1, f"expected one FAISS package, got {faiss}"
    assert FAISS_WHEEL_CUDA.get(faiss[0]) == NGC_CUDA_MAJOR, f"{faiss[0]} is not a CUDA {NGC_CUDA_MAJOR} FAISS build"
    for p in pkgs:  # the image's own DALI is used; any CUDA-suffixed extra must match too
        assert _cuda_suffix_major(p) in (None, NGC_CUDA_MAJOR), f"{p} does not match CUDA {NGC_CUDA_MAJOR}"


def test_cuda_suffix_major():
    assert _cuda_suffix_major("nvidia-dali-cuda130") == 13
    assert _cuda_suffix_major("nvidia-dali-cuda120>=1.30") == 12
    assert _cuda_suffix_major("faiss-gpu-cu12") == 12
    assert _cuda_suffix_major("tensorboard") is None


def test_docker_docs_name_existing_files():
    for doc in ("docker/README.md", "docker/slurm.sbatch", "docker/Dockerfile"):
        text = open(os.path.join(ROOT, doc)).read()
        for ref in set(
            re.findall(r"(?:configs|docker|fastssl|tests)/[\w./-]+\.(?:yaml|py|sbatch|md)|docker/Dockerfile", text)
        ):
            assert os.path.exists(os.path.join(ROOT, ref)), f"{doc} names missing {ref}"
