"""Nearest-neighbour search on FAISS: a GPU index on this process's own CUDA device when CUDA and
faiss GPU support are present, a CPU index otherwise; torch tensors in and out.

Used by the kNN evaluation protocol now, and by the methods that build kNN graphs.
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import torch

# FAISS GPU k-selection limit: GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh (2048 for CUDA
# builds; faiss/gpu/impl/IndexUtils.cu getMaxKSelection, validateKSelect rejects a larger k).
GPU_MAX_K = 2048

_SAID: set = set()  # keys of the notes already printed by this process


def _faiss():
    import faiss

    return faiss


def _say_once(key: str, message: str) -> None:
    """Print ``message`` to stderr the first time ``key`` is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        print(f"fastssl.knn: {message}", file=sys.stderr)


def faiss_gpu_count(faiss) -> int:
    """GPUs the ``faiss`` module can use: 0 for a CPU-only build (no ``get_num_gpus``)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0


def gpu_count() -> int:
    """GPUs available to FAISS here: 0 without CUDA or without a faiss GPU build."""
    try:
        return faiss_gpu_count(_faiss()) if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def placement(cuda_available: bool, faiss_gpus: int,
              requested: bool | None = None) -> tuple[bool, str | None]:
    """(use_gpu, note or None) for an index: ``requested`` None picks the GPU where possible, False
    keeps the CPU, True asks for the GPU; the note says why a GPU is not used where one was expected."""
    if requested is False:
        return False, None
    if not cuda_available:
        return False, ("use_gpu=True but CUDA is not available: the kNN index is on the CPU"
                       if requested else None)
    if faiss_gpus == 0:
        return False, ("CUDA is available but faiss has no GPU support (a CPU-only faiss build): "
                       "the kNN index is on the CPU")
    return True, None


def gpu_plan(k: int, on_gpu: bool) -> tuple[bool, str | None]:
    """(search on the GPU index, note or None) for a search of ``k`` neighbours: past FAISS's GPU
    k-selection limit the search goes to a CPU copy of the index, with a note."""
    if on_gpu and k > GPU_MAX_K:
        return False, (f"k={k} is over FAISS's GPU limit of {GPU_MAX_K} neighbours: "
                       "searching a CPU copy of the index")
    return on_gpu, None


@functools.cache
def _gpu_resources(device: int):
    """This process's FAISS GPU resources for ``device`` (made once: each holds scratch memory)."""
    return _faiss().StandardGpuResources()


KINDS = ("flat", "ivf", "hnsw")


class KNNIndex:
    """Inner-product (``metric='ip'``) or L2 index over ``database`` (N, D).

    ``kind``: ``flat`` (exact), ``ivf`` (inverted lists over sqrt(N) k-means cells, ``nprobe``
    of them searched) or ``hnsw`` (graph, CPU only in FAISS: used on the CPU even with GPUs).
    On the GPU the index lives on ``torch.cuda.current_device()`` alone, so each DDP rank keeps
    its own copy on its own GPU.
    """

    def __init__(self, database: torch.Tensor, metric: str = "ip", use_gpu: bool | None = None,
                 kind: str = "flat", nprobe: int = 16):
        faiss = _faiss()
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        n, d = database.shape
        fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        if kind == "flat":
            cpu_index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        elif kind == "ivf":
            nlist = max(1, int(np.sqrt(n)))
            cpu_index = faiss.index_factory(d, f"IVF{nlist},Flat", fmetric)
            cpu_index.train(_np(database))
            cpu_index.nprobe = min(nprobe, nlist)
        else:
            cpu_index = faiss.index_factory(d, "HNSW32", fmetric)
            use_gpu = False
        cuda = torch.cuda.is_available()
        self.on_gpu, note = placement(cuda, faiss_gpu_count(faiss) if cuda else 0, use_gpu)
        if note:
            _say_once("placement", note)
        if self.on_gpu:
            device = torch.cuda.current_device()  # this rank's GPU, not all of the node's
            self.index = faiss.index_cpu_to_gpu(_gpu_resources(device), device, cpu_index)
        else:
            self.index = cpu_index
        self._cpu_copy = None  # made on the first search past GPU_MAX_K
        self.index.add(_np(database))

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def _index_for(self, k: int):
        """The index that can search ``k`` neighbours: the GPU index, or its CPU copy past GPU_MAX_K."""
        on_gpu, note = gpu_plan(k, self.on_gpu)
        if on_gpu or not self.on_gpu:
            return self.index
        _say_once("gpu_max_k", note)
        if self._cpu_copy is None:
            self._cpu_copy = _faiss().index_gpu_to_cpu(self.index)
        return self._cpu_copy

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities or squared distances, indices), each (Q, k), on the queries' device."""
        k = min(k, self.ntotal)
        sims, idx = self._index_for(k).search(_np(queries), k)
        dev = queries.device
        return torch.from_numpy(sims).to(dev), torch.from_numpy(idx).to(dev)


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
