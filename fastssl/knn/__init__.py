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


class KNNIndex:
    """Exact inner-product (``metric='ip'``) or L2 index over ``database`` (N, D)."""

    def __init__(self, database: torch.Tensor, metric: str = "ip", use_gpu: bool | None = None):
        faiss = _faiss()
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        d = database.shape[1]
        cpu_index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
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
