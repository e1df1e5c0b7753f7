"""The Dockerfile and the docker docs only reference files that exist (no Docker daemon here)."""
import os
import re

from conftest import ROOT


def test_dockerfile_copies_existing_paths():
    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", text, re.M)
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *srcs, _dest = line.split()
        for s in srcs:
            assert os.path.exists(os.path.join(ROOT, s)), f"Dockerfile copies missing {s}"
    assert "faiss-gpu" in text and "--no-deps" in text


def test_docker_docs_name_existing_files():
    for doc in ("docker/README.md", "docker/slurm.sbatch", "docker/Dockerfile"):
        text = open(os.path.join(ROOT, doc)).read()
        for ref in set(re.findall(r"(?:configs|docker|fastssl|tests)/[\w./-]+\.(?:yaml|py|sbatch|md)|docker/Dockerfile", text)):
            assert os.path.exists(os.path.join(ROOT, ref)), f"{doc} names missing {ref}"
