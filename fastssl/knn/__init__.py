"""Nearest-neighbour search on FAISS: a GPU index on this process's own CUDA device when CUDA and
faiss GPU support are present, a CPU index otherwise; torch tensors in and out.  Without FAISS
(a core install, no ``[cpu]``/``[cu12]``/``[cu13]`` extra) the search is exact, on torch, on
the database's device, said once per process.

Used by weighted kNN classification (``classify``: the kNN protocol and monitors), and by the methods
that build kNN graphs (``graph``) or cluster (``cluster``).
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import numpy as np
import torch

from fastssl.errors import choice
from fastssl.log import get_logger

log = get_logger(__name__)

# FAISS GPU k-selection limit: GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh (2048 for CUDA
# builds; faiss/gpu/impl/IndexUtils.cu getMaxKSelection, validateKSelect rejects a larger k).
GPU_MAX_K = 2048

_SAID: set = set()  # keys of the notes already printed by this process


NO_FAISS = (
    "FAISS is not installed: kNN search runs exact on torch (fastssl's [cpu], [cu12] or [cu13] extra "
    "brings FAISS: fastssl doctor says which fits)"
)


def _faiss():
    import faiss

    return faiss


def have_faiss() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


def say_once(key: str, message: str) -> None:
    """Print ``message`` to stderr the first time ``key`` is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        log.warning(f"fastssl.knn: {message}", extra={"every_rank": True})  # (each rank's own index)


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


def placement(cuda_available: bool, faiss_gpus: int, requested: bool | None = None) -> tuple[bool, str | None]:
    """(use_gpu, note or None) for an index: ``requested`` None picks the GPU where possible, False
    keeps the CPU, True asks for the GPU; the note says why a GPU is not used where one was expected."""
    if requested is False:
        return False, None
    if not cuda_available:
        return False, ("use_gpu=True but CUDA is not available: the kNN index is on the CPU" if requested else None)
    if faiss_gpus == 0:
        return False, (
            "CUDA is available but faiss has no GPU support (a CPU-only faiss build): the kNN index is on the CPU"
        )
    return True, None


def gpu_plan(k: int, on_gpu: bool) -> tuple[bool, str | None]:
    """(search on the GPU index, note or None) for a search of ``k`` neighbours: past FAISS's GPU
    k-selection limit the search goes to a CPU copy of the index, with a note."""
    if on_gpu and k > GPU_MAX_K:
        return False, (f"k={k} is over FAISS's GPU limit of {GPU_MAX_K} neighbours: searching a CPU copy of the index")
    return on_gpu, None


@functools.cache
def _gpu_resources(device: int):
    """This process's FAISS GPU resources for ``device`` (made once: each holds scratch memory)."""
    return _faiss().StandardGpuResources()


# method.graph_index (a config field's type): auto = choose_index by the bank's size and device
GraphIndex = Literal["auto", "flat", "ivf", "hnsw"]
GRAPH_INDEXES = get_args(GraphIndex)
KINDS = GRAPH_INDEXES[1:]


class KNNIndex:
    """Inner-product (``metric='ip'``) or L2 index over ``database`` (N, D).

    ``kind``: ``flat`` (exact), ``ivf`` (inverted lists over sqrt(N) k-means cells, ``nprobe``
    of them searched) or ``hnsw`` (graph, CPU only in FAISS: used on the CPU even with GPUs;
    ``ef_search`` its search breadth, None = FAISS's default 16).
    On the GPU the index lives on ``torch.cuda.current_device()`` alone, so each DDP rank keeps
    its own copy on its own GPU.
    """

    def __init__(
        self,
        database: torch.Tensor,
        metric: str = "ip",
        use_gpu: bool | None = None,
        kind: str = "flat",
        nprobe: int = 16,
        ef_search: int | None = None,
    ):
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        choice(kind, "index kind", KINDS)
        self._cpu_copy = None  # made on the first search past GPU_MAX_K
        if not have_faiss():
            say_once("no_faiss", NO_FAISS)
            self.on_gpu, self.index = False, TorchIndex(database, metric)
            return
        faiss = _faiss()
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
            if ef_search is not None:
                cpu_index.hnsw.efSearch = int(ef_search)
            use_gpu = False
        cuda = torch.cuda.is_available()
        self.on_gpu, note = placement(cuda, faiss_gpu_count(faiss) if cuda else 0, use_gpu)
        if note:
            say_once("placement", note)
        if self.on_gpu:
            device = torch.cuda.current_device()  # this rank's GPU, not all of the node's
            self.index = faiss.index_cpu_to_gpu(_gpu_resources(device), device, cpu_index)
        else:
            self.index = cpu_index
        self.index.add(_np(database))

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def _index_for(self, k: int):
        """The index that can search ``k`` neighbours: the GPU index, or its CPU copy past GPU_MAX_K."""
        on_gpu, note = gpu_plan(k, self.on_gpu)
        if on_gpu or not self.on_gpu:
            return self.index
        say_once("gpu_max_k", note)
        if self._cpu_copy is None:
            self._cpu_copy = _faiss().index_gpu_to_cpu(self.index)
        return self._cpu_copy

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities or squared distances, indices), each (Q, k), on the queries' device."""
        k = min(k, self.ntotal)
        if isinstance(self.index, TorchIndex):
            sims, idx = self.index.search(queries, k)
            return sims.to(queries.device), idx.to(queries.device)
        sims, idx = self._index_for(k).search(_np(queries), k)
        dev = queries.device
        return torch.from_numpy(sims).to(dev), torch.from_numpy(idx).to(dev)


class TorchIndex:
    """Exact search on torch, FAISS's stand-in where FAISS is not installed: float32 inner
    products (``ip``) or squared L2 distances (``l2``) of the queries against every row, in
    chunks of queries so that no chunk's (chunk x N) matrix passes 2^26 entries."""

    def __init__(self, database: torch.Tensor, metric: str = "ip"):
        self.x = database.detach().float().contiguous()
        self.metric = metric
        self.norms = (self.x * self.x).sum(1) if metric == "l2" else None

    @property
    def ntotal(self) -> int:
        return len(self.x)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.detach().float().to(self.x.device)
        chunk = max(1, 2**26 // max(1, self.ntotal))
        vals, idxs = [], []
        for s in range(0, len(q), chunk):
            sims = q[s : s + chunk] @ self.x.T
            if self.metric == "ip":
                v, i = sims.topk(k, dim=1)
            else:
                d = (q[s : s + chunk] * q[s : s + chunk]).sum(1, keepdim=True) - 2 * sims + self.norms
                v, i = d.clamp_min(0).topk(k, dim=1, largest=False)
            vals.append(v)
            idxs.append(i)
        if not vals:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(vals), torch.cat(idxs).long()


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


# ----------------------------------------------------------------------------- graph sizing (issue 25)

IMAGENET_N = 1_281_167
# FAISS StandardGpuResources' temporary memory on a GPU of over 8 GiB (kMaxTempMem in
# faiss/gpu/StandardGpuResources.cpp, 1.5 GiB), held from the first GPU index of the process on
# (fastssl keeps one StandardGpuResources per device, _gpu_resources).
FAISS_GPU_TEMP_BYTES = 1536 * 2**20
HNSW_M = 32  # KNNIndex's "HNSW32"
IVF_NPROBE = 16  # KNNIndex's default nprobe

# From the scaling sweep (python -m benchmarks.knn --scale, benchmarks/results/cpu-2cores/knn-scale.*,
# docs/knn.md): the largest N at which the exact graph was measured within the sweep's 200 s cap on
# the 2-core CPU (320,000: 186 s), and the approximate kind beyond it.
FLAT_MAX_N = 320_000
APPROX_KIND = "ivf"


def choose_index(n: int, on_gpu: bool = False) -> str:
    """The FAISS index kind of the InvP graph (``method.graph_index=auto``) for ``n`` bank rows:
    ``flat`` (exact) on a GPU, and on the CPU up to ``FLAT_MAX_N`` = 320,000 rows; ``ivf`` on the
    CPU beyond.

    Measured (``python -m benchmarks.knn --scale``, 2-core AMD EPYC CPU, faiss 1.15.1, unit-norm
    random vectors D=128, k=4, whole graph built and searched; docs/knn.md): exact costs grow as
    N^1.92 (build + search; 48 s at 160,000, 186 s at 320,000, about 2,600 s extrapolated to
    ImageNet's 1,281,167), so on the CPU flat is kept while it is measured affordable, i.e. up to
    the largest N the sweep ran it within its 200 s cap.  Beyond that ivf (sqrt(N) lists, nprobe
    ``IVF_NPROBE`` = 16) costs N^1.58 (124 s at 640,000, about 390 s extrapolated to 1,281,167).
    Its recall@4 against the exact graph depends on the bank (2,000 sampled rows, same machine,
    ``docs/knn.md``): on clustered banks, the shape of a trained one (unit-norm points around
    N/100 centres, noise norm 0.6), 1.000 at 80,000 and 0.998 at 320,000; on the freshly
    initialised random bank of epoch 0 (uniform on the sphere: the worst case, no structure for
    the lists to follow) 0.31 at 80,000, 0.22 at 320,000, 0.20 at 640,000, while the propagation
    loss is still off (its weight is 0 before ``method.rampup_epoch``).  ivf is picked over hnsw:
    the higher recall from 320,000 rows on (hnsw 0.19 / 0.11 at 320,000 / 640,000) and FAISS
    runs it on the GPU (hnsw is CPU only).

    On a GPU the exact search is one (N x D) x (D x N) product per epoch, 4.2e14 FLOP at
    ImageNet's N and D=128 (a few seconds at a Hopper GPU's FP32 rate: an estimate, no GPU was
    measured), with the index 0.6 GiB (``graph_memory``), so ``flat`` is kept there at any N.
    """
    return "flat" if on_gpu or n <= FLAT_MAX_N else APPROX_KIND


def index_bytes(n: int, dim: int, kind: str = "flat") -> int:
    """Bytes of a ``KNNIndex`` of ``kind`` over ``n`` float32 rows of ``dim``: flat stores the rows;
    ivf the rows + an int64 id each + sqrt(n) float32 centroids; hnsw (HNSW32) the rows + int32
    links, 2M at level 0 and M per upper level, E[upper levels] = 1 / (M - 1), + an int32 level and
    an int64 offset per row.  Allocator rounding and list headers are left out: the sweep's CPU
    resident-set growth after the build matched flat and hnsw within 3% (157 / 491 MiB measured vs
    156 / 479 at N = 320,000 / 640,000) and ivf within 1.3x (414 vs 318 MiB at 640,000: its
    inverted lists grow geometrically as rows are added)."""
    choice(kind, "index kind", KINDS)
    if kind == "flat":
        return n * dim * 4
    if kind == "ivf":
        return n * dim * 4 + n * 8 + max(1, int(np.sqrt(n))) * dim * 4
    links = 2 * HNSW_M + HNSW_M / (HNSW_M - 1)  # hnsw
    return int(n * dim * 4 + n * links * 4 + n * 4 + (n + 1) * 8)


def graph_memory(
    n: int,
    dim: int = 128,
    k: int = 4,
    kind: str | None = None,
    monitor_bank: int = 1024,
    monitor_test: int = 1024,
    monitor_dim: int = 2048,
    labeled: int | None = None,
    on_gpu: bool = True,
) -> dict:
    """Bytes the InvP graph costs on one GPU (every rank holds all of it: ``ddp_keep_local``).

    Persistent, as ``fastssl.methods.invp.InvariancePropagation`` registers them:
    ``bank`` (n, dim) float32 and ``graph`` (n, k) int64.  During the per-epoch build
    (``knn_graph``): ``index`` (``index_bytes`` of ``kind``, default ``choose_index(n, on_gpu)``; hnsw is
    on the host, counted under ``host`` instead), ``faiss_temp`` (FAISS's GPU scratch, 1.5 GiB,
    kept from the first GPU index on), ``search`` (the k + 1 results: float32 similarities and
    int64 ids copied back to the device, with the queries on the device for FAISS's unpaged
    search: an upper bound) and ``graph_build`` (knn_graph's masks and index temporaries and the
    (n, k) selection before ``graph.copy_``, all counted as alive at once).  At the epoch's end (rank 0): ``monitor`` (the
    engine's KNNMonitor, ``fastssl.engine.monitors``: ``monitor_bank`` + ``monitor_test``
    features of ``monitor_dim`` float32 (ResNet-50's pooled 2,048), their normalised copies and
    a flat GPU index of the bank) and ``invp_monitor`` (InvP's own ``knn_monitor``: the
    ``labeled`` bank rows, default all n, gathered on the device, then a flat GPU index of them).
    ``build_peak`` / ``monitor_peak``: persistent + the phase's own; ``peak``: the larger;
    ``host``: the bank's host copy FAISS reads (+ an hnsw index).  ``on_gpu=False``: the CPU
    case (index and scratch on the host, ``faiss_temp`` 0).
    """
    kind = kind or choose_index(n, on_gpu)
    labeled = n if labeled is None else labeled
    f32, i64 = 4, 8
    out = {"n": n, "dim": dim, "k": k, "kind": kind, "bank": n * dim * f32, "graph": n * k * i64}
    idx = index_bytes(n, dim, kind)
    index_on_gpu = on_gpu and kind != "hnsw"
    out["index"] = idx if index_on_gpu else 0
    out["faiss_temp"] = FAISS_GPU_TEMP_BYTES if on_gpu else 0
    out["search"] = n * (k + 1) * (f32 + i64) + (n * dim * f32 if index_on_gpu else 0)
    # knn_graph's temporaries, all alive at once as an upper bound: the self and keep masks (bool)
    # and the float copy argmax reads, n-long int64 aranges / argmax / full / drop and a bool any,
    # and the (n, k) selection idx[keep]
    out["graph_build"] = n * (k + 1) * (1 + 1 + f32) + n * (5 * i64 + 1) + n * k * i64
    mon = (monitor_bank + monitor_test) * monitor_dim * f32
    out["monitor"] = 2 * mon + monitor_bank * monitor_dim * f32
    out["invp_monitor"] = labeled * dim * f32 * 2
    out["host"] = n * dim * f32 + (idx if not index_on_gpu else 0)
    persistent = out["bank"] + out["graph"]
    out["build_peak"] = persistent + out["index"] + out["faiss_temp"] + out["search"] + out["graph_build"]
    out["monitor_peak"] = persistent + out["faiss_temp"] + out["monitor"] + out["invp_monitor"]
    out["peak"] = max(out["build_peak"], out["monitor_peak"])
    return out
