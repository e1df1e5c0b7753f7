"""Nearest-neighbour search on FAISS: GPU indices when CUDA and faiss GPU are present (sharded
over the local GPUs), CPU indices otherwise; torch tensors in and out.

Used by the kNN evaluation protocol now, and by the methods that build kNN graphs.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    try:
        return _faiss().get_num_gpus() if torch.cuda.is_available() else 0
    except Exception:
        return 0


KINDS = ("flat", "ivf", "hnsw")


class KNNIndex:
    """Inner-product (``metric='ip'``) or L2 index over ``database`` (N, D).

    ``kind``: ``flat`` (exact), ``ivf`` (inverted lists over sqrt(N) k-means cells, ``nprobe``
    of them searched) or ``hnsw`` (graph, CPU only in FAISS: used on the CPU even with GPUs).
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
        use_gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        if use_gpu:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # database split over the local GPUs
            self.index = faiss.index_cpu_to_all_gpus(cpu_index, co=co)
        else:
            self.index = cpu_index
        self.on_gpu = use_gpu
        self.index.add(_np(database))

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(similarities or squared distances, indices), each (Q, k), on the queries' device."""
        k = min(k, self.ntotal)
        sims, idx = self.index.search(_np(queries), k)
        dev = queries.device
        return torch.from_numpy(sims).to(dev), torch.from_numpy(idx).to(dev)


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
