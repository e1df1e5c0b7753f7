"""FAISS GPU placement and k-limit decisions, exercised on the CPU with the real faiss package."""

import types

import pytest
import torch

from fastssl import knn
from fastssl.knn import GPU_MAX_K, KNNIndex, faiss_gpu_count, gpu_plan, placement


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees a process that has printed no note yet."""
    monkeypatch.setattr(knn, "_SAID", set())


def test_gpu_max_k_is_faiss_gpu_selection_limit():
    # GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh (CUDA > 9.0 builds)
    assert GPU_MAX_K == 2048


@pytest.mark.parametrize(
    "cuda, gpus, requested, use_gpu, noted",
    [
        (False, 0, None, False, False),  # CPU machine: CPU index, nothing to say
        (False, 0, True, False, True),  # GPU asked for without CUDA
        (True, 0, None, False, True),  # CPU-only faiss on a CUDA machine
        (True, 0, True, False, True),
        (True, 2, None, True, False),
        (True, 2, True, True, False),
        (True, 2, False, False, False),  # use_gpu=False always stays on the CPU
    ],
)
def test_placement_every_branch(cuda, gpus, requested, use_gpu, noted):
    got, note = placement(cuda, gpus, requested)
    assert got is use_gpu
    assert (note is not None) is noted
    if note:
        assert "\n" not in note and "CPU" in note


def test_placement_names_cpu_only_faiss():
    _, note = placement(True, 0)
    assert "faiss has no GPU support" in note


@pytest.mark.parametrize(
    "k, on_gpu, gpu, noted",
    [
        (10, True, True, False),
        (GPU_MAX_K, True, True, False),
        (GPU_MAX_K + 1, True, False, True),  # over the limit: the CPU copy searches
        (10 * GPU_MAX_K, False, False, False),  # a CPU index has no such limit
    ],
)
def test_gpu_plan_every_branch(k, on_gpu, gpu, noted):
    got, note = gpu_plan(k, on_gpu)
    assert got is gpu
    assert (note is not None) is noted
    if note:
        assert str(k) in note and str(GPU_MAX_K) in note and "\n" not in note


def test_faiss_gpu_count_real_and_cpu_only_build():
    import faiss

    assert faiss_gpu_count(faiss) == faiss.get_num_gpus()  # the installed faiss-gpu wheel
    assert faiss_gpu_count(types.SimpleNamespace()) == 0  # a CPU-only build lacks get_num_gpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_use_gpu_without_cuda_falls_back_to_cpu_and_says_so_once(capfd):
    """Without CUDA, ``use_gpu=True`` used to build an empty sharded index (every search failed)."""
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(300, 16, generator=g), torch.randn(5, 16, generator=g)
    index = KNNIndex(db, "ip", use_gpu=True)
    assert not index.on_gpu and index.ntotal == 300
    sims, idx = index.search(q, 7)
    exact = (q @ db.T).topk(7, dim=1)
    assert torch.equal(idx, exact.indices)
    assert torch.allclose(sims, exact.values, atol=1e-4)
    KNNIndex(db, "ip", use_gpu=True)
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fastssl.knn:")]
    assert len(notes) == 1 and "CUDA is not available" in notes[0]


def test_cpu_index_searches_past_gpu_limit_silently(capfd):
    """k over GPU_MAX_K on a CPU index: searched as asked, no note."""
    g = torch.Generator().manual_seed(1)
    db = torch.randn(GPU_MAX_K + 500, 8, generator=g)
    index = KNNIndex(db, "l2", use_gpu=False)
    _, idx = index.search(db[:3], GPU_MAX_K + 100)
    assert idx.shape == (3, GPU_MAX_K + 100) and torch.equal(idx[:, 0], torch.arange(3))
    assert "fastssl.knn:" not in capfd.readouterr().err


@pytest.mark.skipif(knn.gpu_count() == 0, reason="needs CUDA and a faiss GPU build")
def test_gpu_index_on_current_device_and_past_gpu_limit(capfd):
    """On a GPU machine: one device (this rank's), and k over the limit answered by the CPU copy."""
    import faiss

    db = torch.randn(GPU_MAX_K + 500, 8, generator=torch.Generator().manual_seed(2))
    index = KNNIndex(db, "ip")
    assert index.on_gpu
    assert faiss.downcast_index(index.index).getDevice() == torch.cuda.current_device()
    sims, _ = index.search(db[:4], GPU_MAX_K + 10)
    exact = (db[:4] @ db.T).topk(GPU_MAX_K + 10, dim=1)
    assert torch.allclose(sims, exact.values, atol=1e-3)
    index.search(db[:4], GPU_MAX_K + 20)
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fastssl.knn:")]
    assert len(notes) == 1 and str(GPU_MAX_K) in notes[0]
