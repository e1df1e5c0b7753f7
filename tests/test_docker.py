"""The Dockerfile and the docker docs only reference files that exist (no Docker daemon here), and the
Dockerfile's base image and GPU packages are ones fastssl works with."""

import os
import re

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

# First NGC PyTorch release whose Triton returns tl.atomic_add's result to every thread of a block
# (fastssl/kernels/bank_loss.py, _bank_scan, relies on it): the bug is triton-lang/triton#7402, fixed by #7460
# (merged July 2025, after release/3.4.x was cut: pytorch/pytorch#156890, and still open in 3.4.0 per
# triton-lang/triton#7957), so Triton 3.5.0 is the first release with it; NGC 25.10 is PyTorch 2.9.0a0,
# the series built on Triton 3.5.0 (NVIDIA/TensorRT-LLM requirements.txt for rel-25-10: triton==3.5.0).
FIRST_FIXED_NGC = (25, 10)
# NGC releases from 25.10 on are CUDA 13 (NVIDIA release notes: Triton server 25.10 CUDA 13.0.2, PyTorch 25.12
# CUDA 13.1.0, 26.06 CUDA 13.3.0), so an image that passes the check above needs CUDA 13 packages.
NGC_CUDA_MAJOR = 13
# CUDA major of the FAISS GPU wheels on PyPI (their METADATA "Environment :: GPU :: NVIDIA CUDA :: N" classifier;
# faiss-cuda went back to CUDA 12 from 1.14.3 on).
FAISS_WHEEL_CUDA = {
    "faiss-gpu": 12,
    "faiss-gpu-cu12": 12,
    "faiss-cuda-cu128": 12,
    "faiss-cuda==1.14.3.post0": 12,
    "faiss-cuda==1.14.1.post4": 13,
}
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def _dockerfile() -> str:
    return open(os.path.join(ROOT, "docker", "Dockerfile")).read()


def _installed_extras(text: str) -> list:
    """The extras the Dockerfile's pip install of the fastssl wheel asks for (fastssl-*.whl[cu13] -> [cu13])."""
    return [e.strip() for m in re.findall(r"fastssl-\*\.whl\)?\[([\w,]+)\]", text) for e in m.split(",")]


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
    # what a wheel build needs: the project file, the readme it names, the package
    copied = {s for line in copies for s in line.split()[:-1]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], "fastssl"} <= copied


def test_dockerfile_installs_the_wheel_with_an_extra_that_exists_and_keeps_the_image_stack():
    text = _dockerfile()
    extras = _installed_extras(text)
    assert extras == ["cu13"], extras
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert re.search(r"pip wheel .*--no-deps", text) and "-e ." not in text  # a wheel, not an editable install
    assert re.search(r"--constraint /tmp/keep\.txt", text)  # the image's torch/Triton/DALI are not replaced


def test_driver_capabilities_include_video():
    m = re.search(r"^ENV NVIDIA_DRIVER_CAPABILITIES=(\S+)\s*$", _dockerfile(), re.M)
    assert m, "no ENV NVIDIA_DRIVER_CAPABILITIES: the container would get no hardware JPEG decoder"
    assert {"compute", "utility", "video"} <= set(m.group(1).split(","))


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
    (extra,) = _installed_extras(_dockerfile())
    pkgs = [re.split(r"[<>!~;\[ ]", r)[0] for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    reqs = PYPROJECT["project"]["optional-dependencies"][extra]
    faiss = [r for r in reqs if r.startswith("faiss")]
    assert len(faiss) == 1, f"expected one FAISS package in [{extra}], got {faiss}"
    assert FAISS_WHEEL_CUDA.get(faiss[0]) == NGC_CUDA_MAJOR, f"{faiss[0]} is not a CUDA {NGC_CUDA_MAJOR} FAISS build"
    dali = [p for p in pkgs if p.startswith("nvidia-dali")]
    assert [_cuda_suffix_major(p) for p in dali] == [NGC_CUDA_MAJOR], dali
    for p in pkgs:  # any CUDA-suffixed package must match too
        assert _cuda_suffix_major(p) in (None, NGC_CUDA_MAJOR), f"{p} does not match CUDA {NGC_CUDA_MAJOR}"


def test_the_cu12_extra_is_cuda_12_throughout():
    reqs = PYPROJECT["project"]["optional-dependencies"]["cu12"]
    faiss = [r.split(">")[0].split("=")[0] for r in reqs if r.startswith("faiss")]
    assert [FAISS_WHEEL_CUDA.get(f) for f in faiss] == [12]
    assert [_cuda_suffix_major(r) for r in reqs if r.startswith("nvidia-dali")] == [12]


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
