"""kNN-graph building (every row's k nearest other rows, inner product on unit vectors):
FAISS (GPU index where present, else CPU) vs torch brute force vs scikit-learn, one run.

    python -m benchmarks.knn [--n 20000] [--d 128] [--k 5] [--repeats 3] [--warmup 1]
                             [--impls faiss-flat torch sklearn faiss-hnsw]

``--impls`` picks the implementations (e.g. ``--impls faiss-flat torch --n 1281167`` for the
ImageNet-size graph, where scikit-learn and the CPU HNSW build would take far too long); the
baseline is torch brute force (on the GPU where present).  An implementation that fails (e.g.
out of memory) gives an error row, not a crash.

Scaling sweep (issue 25, "kNN costs as the work grows"):

    python -m benchmarks.knn --scale [--sizes 10000 20000 ... 1281167] [--kinds flat ivf hnsw cagra]
                             [--d 128] [--k K] [--max-seconds 120] [--sample 2000] [--out DIR]
                             [--nprobe 16] [--ef-search 16]

For each N (unit-norm random vectors) and each index kind of ``fastssl.knn.KNNIndex`` (``flat``
exact, ``ivf``, ``hnsw``; ``cagra`` = FAISS's GPU CAGRA, only where faiss has ``GpuIndexCagra``
and a GPU is present), one fresh subprocess per point measures: build time (index construction,
training and add), search time of the whole graph (all N rows queried, k + 1 neighbours as
``fastssl.methods.invp.knn_graph`` asks), peak memory (CPU: growth of the resident set, VmHWM
after resetting it through /proc/self/clear_refs, else a VmRSS sampler; GPU: growth of the
device's used memory, cudaMemGetInfo sampled, which sees FAISS's own allocations) and recall@k of
the approximate kinds against the exact graph (self excluded on both sides, as in the InvP graph):
over every row where the flat point of that N ran, else over ``--sample`` rows against their exact
neighbours by brute-force torch matmul.  ``--k`` defaults to InvP's ``graph_k``.  A point whose
build + search time, estimated from a log-log fit of the kind's previous points, exceeds
``--max-seconds`` (or whose memory estimate exceeds what is free), or that fails or runs past
twice that limit, gives a 'skipped: reason' row; larger N of that kind are skipped too.  The
table footer states each kind's fitted exponents (time ~ N^b, least squares on log-log) and the
extrapolated time at N = 1,281,167 (ImageNet), labelled as such.  Results: ``knn-scale.json``,
``.md`` and ``.png`` (time vs N, log-log, with the fits).

Recall of ``method.graph_index=auto``'s approximate kind on two kinds of bank:

    python -m benchmarks.knn --ivf-recall [--sizes 80000 320000] [--nprobes 16 64] [--sample 2000]

recall@k of the ivf index (``KNNIndex(kind="ivf")``, sqrt(N) lists) against exact neighbours for
``--sample`` rows, at each nprobe, on a ``random`` bank (unit-norm Gaussian rows: InvP's bank at
initialisation, the worst case) and a ``clustered`` one (unit-norm points around N/100 random
centres with Gaussian noise of norm 0.6: the shape of a trained bank, whose images gather around
classes and instances).  Results: ``knn-ivf-recall.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, emit, environment, publish, timed, write_results  # noqa: E402
from fastssl.knn import KNNIndex, gpu_count  # noqa: E402

IMPLS = ("faiss-flat", "torch", "sklearn", "faiss-hnsw")


def torch_graph(x, k, chunk=None):
    """Each row's k + 1 largest inner products (itself included), in row chunks of at most
    2^30 similarities (4,096 rows up to N = 262,144)."""
    chunk = chunk or max(256, min(4096, 2**30 // max(1, len(x))))
    out = []
    for s in range(0, len(x), chunk):
        out.append((x[s : s + chunk] @ x.t()).topk(k + 1, dim=1).indices)
    return torch.cat(out)


def sklearn_graph(x, k):
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x.cpu().numpy())
    return nn_.kneighbors(x.cpu().numpy(), return_distance=False)  # unit vectors: L2 order = IP order


def run(n, d, k, repeats, impls=IMPLS, warmup=1):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1).to(dev)
    every = {
        "faiss-flat": (f"faiss-flat ({'gpu' if gpu_count() else 'cpu'})", lambda: KNNIndex(x, "ip").search(x, k + 1)),
        "torch": (f"torch brute force ({dev})", lambda: torch_graph(x, k)),
        "sklearn": ("scikit-learn (cpu)", lambda: sklearn_graph(x, k)),
        "faiss-hnsw": ("faiss-hnsw (cpu)", lambda: KNNIndex(x, "ip", kind="hnsw").search(x, k + 1)),
    }
    rows = []
    for key in impls:
        name, fn = every[key]
        try:
            ts = timed(fn, repeats, warmup)
        except Exception as e:  # e.g. out of memory: an error row, the others still run
            why = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            rows.append({"impl": name, "n": n, "d": d, "k": k, "error": f"{type(e).__name__}: {why}"[:200]})
            print(f"  knn {name:24s} FAILED: {rows[-1]['error']}", file=sys.stderr, flush=True)
            emit(rows[-1])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        rows.append(
            {
                "impl": name,
                "n": n,
                "d": d,
                "k": k,
                "seconds_median": sorted(ts)[len(ts) // 2],
                "seconds_min": min(ts),
                "seconds_max": max(ts),
            }
        )
        print(f"  knn {name:24s} {rows[-1]['seconds_median']:.3f}s", flush=True)
        emit(rows[-1])
    base = next((r for r in rows if r["impl"].startswith("torch") and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["speedup_vs_torch"] = base["seconds_median"] / r["seconds_median"] if base else None
    return rows


# ----------------------------------------------------------------------------- scaling sweep

SCALE_KINDS = ("flat", "ivf", "hnsw", "cagra")
IMAGENET_N = 1_281_167
SCALE_SIZES = (10000, 20000, 40000, 80000, 160000, 320000, 640000, IMAGENET_N)


def invp_graph_k() -> int:
    """InvP's default ``method.graph_k`` (the k of the graph the sweep measures)."""
    from fastssl.methods.invp import InvPConfig

    return InvPConfig.graph_k


def unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) float32 unit-norm Gaussian vectors; the rows of a smaller n are a prefix of a larger one's."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def cagra_unavailable() -> str | None:
    """Why FAISS's GPU CAGRA cannot run here, or None when it can."""
    import faiss

    if not hasattr(faiss, "GpuIndexCagra"):
        return f"faiss {faiss.__version__} here has no GpuIndexCagra (needs a faiss GPU build with cuVS)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


class CagraIndex:
    """FAISS's GPU CAGRA graph index (cuVS) with KNNIndex's interface: torch in, torch out.  L2
    metric: on unit vectors its neighbour order is the inner product's."""

    def __init__(self, database: torch.Tensor, graph_degree: int = 32, intermediate_graph_degree: int = 64):
        import faiss

        self.res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexCagraConfig()
        cfg.device = torch.cuda.current_device()
        cfg.graph_degree = graph_degree
        cfg.intermediate_graph_degree = intermediate_graph_degree
        self.index = faiss.GpuIndexCagra(self.res, database.shape[1], faiss.METRIC_L2, cfg)
        self.index.train(_host(database))  # CAGRA builds its graph in train()

    def search(self, queries: torch.Tensor, k: int):
        d, i = self.index.search(_host(queries), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device)


def _host(x: torch.Tensor):
    import numpy as np

    return np.ascontiguousarray(x.detach().float().cpu().numpy())


def _status_kib(*keys) -> dict:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 for k in keys}


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakSampler(threading.Thread):
    """Samples this process's VmRSS and (on a GPU) the device's used memory every ``dt`` seconds."""

    def __init__(self, gpu: bool, dt: float = 0.005):
        super().__init__(daemon=True)
        self.gpu, self.dt, self.stop_ = gpu, dt, threading.Event()
        self.rss = _status_kib("VmRSS")["VmRSS"]
        self.gpu_used = self._gpu_used()

    def _gpu_used(self) -> int:
        if not self.gpu:
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def run(self):
        while not self.stop_.is_set():
            self.rss = max(self.rss, _status_kib("VmRSS")["VmRSS"])
            self.gpu_used = max(self.gpu_used, self._gpu_used())
            time.sleep(self.dt)

    def stop(self):
        self.stop_.set()
        self.join()
        self.rss = max(self.rss, _status_kib("VmRSS")["VmRSS"])
        self.gpu_used = max(self.gpu_used, self._gpu_used())


def measure_point(
    kind: str, n: int, d: int, k: int, seed: int, out_npy: str, nprobe: int = 16, ef_search: int | None = None
) -> dict:
    """One point of the sweep, in this (fresh) process: build + whole-graph search of ``kind`` over
    ``n`` unit vectors; the (n, k + 1) neighbour indices go to ``out_npy``."""
    import numpy as np

    gpu = torch.cuda.is_available() and (kind == "cagra" or (kind != "hnsw" and gpu_count() > 0))
    x = unit_vectors(n, d, seed)
    if torch.cuda.is_available():
        x = x.cuda()  # InvP's bank lives on the training device
        torch.cuda.synchronize()
    import faiss  # noqa: F401  (its import is not part of the build)

    base = _status_kib("VmRSS")["VmRSS"]
    hwm = _reset_peak_rss()
    sampler = _PeakSampler(gpu)
    gpu_base = sampler.gpu_used
    sampler.start()

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    index = CagraIndex(x) if kind == "cagra" else KNNIndex(x, "ip", kind=kind, nprobe=nprobe, ef_search=ef_search)
    sync()
    t1 = time.perf_counter()
    after_build = _status_kib("VmRSS")["VmRSS"]
    _, idx = index.search(x, k + 1)
    sync()
    t2 = time.perf_counter()
    sampler.stop()
    peak = _status_kib("VmHWM")["VmHWM"] if hwm else sampler.rss
    np.save(out_npy, idx.cpu().numpy().astype(np.int64))
    return {
        "kind": kind,
        "n": n,
        "d": d,
        "k": k,
        "device": "gpu" if gpu else "cpu",
        "build_s": t1 - t0,
        "search_s": t2 - t1,
        "total_s": t2 - t0,
        "rss_base_bytes": base,
        "index_rss_bytes": after_build - base,
        "peak_rss_growth_bytes": peak - base,
        "peak_rss_method": "VmHWM after clear_refs" if hwm else "VmRSS sampled every 5 ms",
        "gpu_peak_bytes": (sampler.gpu_used - gpu_base) if gpu else None,
        "threads": faiss.omp_get_max_threads(),
        "nprobe": nprobe if kind == "ivf" else None,
        "ef_search": (ef_search or 16) if kind == "hnsw" else None,
    }


def drop_self(idx, k: int):
    """(n, k) neighbours from (n, k + 1) search results: self removed (normally the first column),
    rows without self lose their last column; as ``fastssl.methods.invp.knn_graph`` does."""
    import numpy as np

    return drop_rows(idx, np.arange(len(idx)), k)


def drop_rows(idx, rows, k: int):
    """``drop_self`` for the queries ``rows`` of the database (a sample): each query's own id removed."""
    import numpy as np

    self_mask = idx == rows[:, None]
    drop = np.where(self_mask.any(1), self_mask.argmax(1), idx.shape[1] - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(idx)), drop] = False
    return idx[keep].reshape(len(idx), idx.shape[1] - 1)[:, :k]


def recall_at_k(approx, exact) -> float:
    """Mean over rows of |approx row ∩ exact row| / k (-1 entries, i.e. missing results, count as misses)."""
    import numpy as np

    hit = np.zeros(len(exact), dtype=np.int64)
    for s in range(0, len(exact), 65536):
        a, e = approx[s : s + 65536], exact[s : s + 65536]
        hit[s : s + 65536] = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(2).sum(1)
    return float(hit.sum() / exact.size)


def exact_sample(n: int, d: int, k: int, seed: int, rows):
    """Exact k nearest other rows of the ``rows`` of the (n, d) sweep data: torch brute force."""
    x = unit_vectors(n, d, seed)
    q = x[torch.as_tensor(rows)]
    out = []
    for s in range(0, len(q), 128):  # 128 x n similarities at a time (656 MB at n = 1.28M)
        out.append((q[s : s + 128] @ x.t()).topk(k + 1, dim=1).indices)
    return torch.cat(out).numpy()


def loglog_fit(ns, ts):
    """(exponent b, prefactor a) of t = a * n^b, least squares on log t vs log n; None under 2 points."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t and t > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return b, math.exp(my - b * mx)


def estimate_seconds(history, n: int) -> float | None:
    """Build + search seconds at ``n`` from a kind's previous points [(n, total_s)]: the log-log fit
    of the last three (exponent at least 1), or exponent 2 from a single point; None without any."""
    if not history:
        return None
    if len(history) == 1:
        n0, t0 = history[0]
        return t0 * (n / n0) ** 2
    fit = loglog_fit([h[0] for h in history[-3:]], [h[1] for h in history[-3:]])
    n0, t0 = history[-1]
    b = max(1.0, fit[0]) if fit else 2.0
    return t0 * (n / n0) ** b


def estimate_bytes(history, n: int) -> float | None:
    """Peak bytes at ``n`` from a kind's previous points [(n, bytes)]: proportional to n (the largest point's rate)."""
    if not history:
        return None
    n0, b0 = history[-1]
    return max(0.0, b0) * n / n0


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+)", f.read(), re.M).group(1)) * 1024


def _run_point(kind, n, d, k, seed, tmp, hard_limit, nprobe=16, ef_search=None):
    """measure_point in a fresh subprocess: (result dict, neighbour indices) or (error string, None)."""
    import numpy as np

    out_npy = os.path.join(tmp, f"{kind}-{n}.npy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.knn",
        "--point",
        kind,
        str(n),
        str(d),
        str(k),
        str(seed),
        out_npy,
        "--nprobe",
        str(nprobe),
    ] + (["--ef-search", str(ef_search)] if ef_search else [])
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=hard_limit)
    except subprocess.TimeoutExpired:
        return f"ran past the hard limit of {hard_limit:.0f} s (2 x --max-seconds) and was stopped", None
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        why = next((ln for ln in reversed(p.stderr.splitlines()) if ln.strip()), "") or f"exit status {p.returncode}"
        if p.returncode < 0:
            why = f"killed by signal {-p.returncode} (out of memory?)"
        return f"failed: {why}"[:200], None
    res = json.loads(line[len("RESULT ") :])
    idx = np.load(out_npy)
    os.remove(out_npy)
    return res, idx


def scale(
    sizes,
    kinds,
    d: int,
    k: int,
    max_seconds: float,
    sample: int = 2000,
    seed: int = 0,
    log=print,
    nprobe: int = 16,
    ef_search: int | None = None,
):
    """The sweep: one row per (N, kind), measured or 'skipped: reason'; see the module docstring."""
    import numpy as np

    kinds = sorted(kinds, key=SCALE_KINDS.index)  # flat first: the exact graph of each N
    rows, times, mems, stopped = [], {kd: [] for kd in kinds}, {kd: [] for kd in kinds}, {}
    unavailable = {"cagra": cagra_unavailable()} if "cagra" in kinds else {}
    with tempfile.TemporaryDirectory(prefix="knn-scale-") as tmp:
        for n in sorted(set(sizes)):
            exact, sample_exact = None, None
            for kind in kinds:
                row = {"kind": kind, "n": n, "d": d, "k": k}
                est = estimate_seconds(times[kind], n)
                est_mem = estimate_bytes(mems[kind], n)
                free = (
                    _mem_available()
                    if kind == "hnsw" or not torch.cuda.is_available()
                    else torch.cuda.mem_get_info()[0]
                )
                why = unavailable.get(kind) or stopped.get(kind)
                if not why and est is not None and est > max_seconds:
                    why = f"estimated {est:.3g} s > --max-seconds {max_seconds:g} (fit of the previous points)"
                if not why and est_mem is not None and est_mem > 0.8 * free:
                    why = f"estimated peak memory {est_mem / 2**30:.1f} GiB > 80% of the {free / 2**30:.1f} GiB free"
                if why:
                    rows.append({**row, "skipped": why})
                    log(f"  knn-scale {kind:6s} N={n:>8d}  skipped: {why}", flush=True)
                    if kind not in unavailable:
                        stopped.setdefault(kind, f"a smaller N ({n}) was skipped")
                    continue
                if est is not None:
                    row["estimated_s"] = est
                res, idx = _run_point(kind, n, d, k, seed, tmp, max(60.0, 2 * max_seconds), nprobe, ef_search)
                if idx is None:
                    rows.append({**row, "skipped": res})
                    log(f"  knn-scale {kind:6s} N={n:>8d}  skipped: {res}", flush=True)
                    stopped[kind] = f"a smaller N ({n}) failed or ran past the limit"
                    continue
                row.update(res)
                got = drop_self(idx, k)
                if kind == "flat":
                    exact = got
                    row["recall"], row["recall_rows"] = 1.0, n
                elif exact is not None:
                    row["recall"], row["recall_rows"] = recall_at_k(got, exact), n
                else:
                    pick = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
                    if sample_exact is None:
                        sample_exact = drop_rows(exact_sample(n, d, k, seed, pick), pick, k)
                    row["recall"], row["recall_rows"] = recall_at_k(got[pick], sample_exact), len(pick)
                times[kind].append((n, row["total_s"]))
                mems[kind].append(
                    (n, row["gpu_peak_bytes"] if row["device"] == "gpu" else row["peak_rss_growth_bytes"])
                )
                rows.append(row)
                log(
                    f"  knn-scale {kind:6s} N={n:>8d}  build {row['build_s']:8.2f}s  search {row['search_s']:8.2f}s  "
                    f"peak +{row['peak_rss_growth_bytes'] / 2**20:7.0f} MiB  recall@{k} {row['recall']:.3f}",
                    flush=True,
                )
    return rows


def scale_fits(rows, fit_min_n: int = 0) -> dict:
    """Per kind: the log-log exponents of build, search and total seconds vs N, and their
    extrapolations to N = 1,281,167 (ImageNet); peak memory per row (largest point) and its
    extrapolation; measured recall at the largest N."""
    fits = {}
    for kind in SCALE_KINDS:
        ok = [r for r in rows if r["kind"] == kind and "skipped" not in r and r["n"] >= fit_min_n]
        if not ok:
            continue
        ns = [r["n"] for r in ok]
        f = {"points": len(ok), "n_range": [min(ns), max(ns)]}
        for key in ("build_s", "search_s", "total_s"):
            fit = loglog_fit(ns, [r[key] for r in ok])
            f[key.replace("_s", "_exponent")] = fit[0] if fit else None
            f[f"{key}_at_imagenet_extrapolated"] = fit[1] * IMAGENET_N ** fit[0] if fit else None
        big = max(ok, key=lambda r: r["n"])
        mem = big["gpu_peak_bytes"] if big["device"] == "gpu" else big["peak_rss_growth_bytes"]
        f["peak_bytes_per_row"] = mem / big["n"]
        f["peak_bytes_at_imagenet_extrapolated"] = mem / big["n"] * IMAGENET_N
        f["recall_at_largest_n"] = big["recall"]
        if kind == "flat":  # exact search is O(N^2 D): the largest point scaled by N^2
            f["search_s_at_imagenet_n2"] = big["search_s"] * (IMAGENET_N / big["n"]) ** 2
        f["largest_n"] = big["n"]
        imnet = next((r for r in ok if r["n"] == IMAGENET_N), None)
        f["total_s_at_imagenet_measured"] = imnet["total_s"] if imnet else None
        fits[kind] = f
    return fits


def _fmt_s(t):
    return "-" if t is None else f"{t:.3g}" if t < 10 else f"{t:,.0f}"


def scale_table(rows, fits, a) -> str:
    k = a.k
    lines = [
        f"| kind | N | build s | search s | total s | index RSS MiB | peak RSS growth MiB | recall@{k} | recall over |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_kind = sorted(rows, key=lambda r: (SCALE_KINDS.index(r["kind"]), r["n"]))
    for i, r in enumerate(by_kind):
        if "skipped" in r:
            prev = by_kind[i - 1] if i else None
            if prev is not None and prev["kind"] == r["kind"] and "skipped" in prev:
                continue  # one row per kind for its skipped sizes
            rest = [x["n"] for x in by_kind[i + 1 :] if x["kind"] == r["kind"]]
            ns = f"{r['n']:,}" + (f" and up ({', '.join(f'{x:,}' for x in rest)})" if rest else "")
            lines.append(f"| {r['kind']} | {ns} | skipped: {r['skipped'].replace('|', '/')} | | | | | | |")
            continue
        gpu = f" (GPU +{r['gpu_peak_bytes'] / 2**20:,.0f})" if r.get("gpu_peak_bytes") is not None else ""
        over = "all rows" if r["recall_rows"] == r["n"] else f"{r['recall_rows']:,} rows"
        lines.append(
            f"| {r['kind']} ({r['device']}) | {r['n']:,} | {_fmt_s(r['build_s'])} | {_fmt_s(r['search_s'])} | "
            f"{_fmt_s(r['total_s'])} | {r['index_rss_bytes'] / 2**20:,.0f} | "
            f"{r['peak_rss_growth_bytes'] / 2**20:,.0f}{gpu} | {r['recall']:.4f} | "
            f"{over} |"
        )
    env = environment()
    threads = next((r["threads"] for r in rows if "threads" in r), None)
    foot = [
        f"\nkNN graph of N unit-norm random vectors, D={a.d}, k={k} (InvP's graph_k; each search asks k + 1, "
        f"self dropped), all N rows queried; one fresh process per point, one run each. Machine: {env['device']} "
        f"({env['cpu']}, {threads} FAISS threads), faiss {env.get('faiss')}, torch {env['torch']}. "
        f"ivf = IVF sqrt(N) lists, nprobe {a.nprobe}; hnsw = HNSW32 (efConstruction 40, efSearch {a.ef_search or 16}), "
        f"{'as fastssl.knn.KNNIndex builds them by default' if (a.nprobe, a.ef_search or 16) == (16, 16) else 'NOT KNNIndex defaults (16, 16)'}. Recall@k of each kind against the exact (flat) graph of the same N; "
        f"where flat was skipped, over {a.sample:,} sampled rows against torch brute force. "
        f"Time cap --max-seconds {a.max_seconds:g} per point (build + search), estimated from the kind's previous points.",
        "",
        "Fitted growth law, time = a * N^b (least squares on log-log over the measured points):",
        "",
    ]
    for kind, f in fits.items():
        if f.get("total_exponent") is None:
            foot.append(
                f"* **{kind}**: no fit ({f['points']} measured point); recall@{k} {f['recall_at_largest_n']:.3f} "
                f"at N = {f['largest_n']:,}."
            )
            continue

        def ex(key):
            v = f.get(key)
            return "-" if v is None else f"{v:.2f}"

        foot.append(
            f"* **{kind}**: build N^{ex('build_exponent')}, search N^{ex('search_exponent')}, "
            f"total N^{ex('total_exponent')} (over {f['points']} points, N = {f['n_range'][0]:,} to "
            f"{f['n_range'][1]:,}). **Extrapolated (not measured)** to N = 1,281,167: "
            f"total {_fmt_s(f['total_s_at_imagenet_extrapolated'])} s (build "
            f"{_fmt_s(f['build_s_at_imagenet_extrapolated'])} s + search {_fmt_s(f['search_s_at_imagenet_extrapolated'])} s)"
            + (
                f"; measured there: {_fmt_s(f['total_s_at_imagenet_measured'])} s"
                if f.get("total_s_at_imagenet_measured")
                else ""
            )
            + (
                f"; with the theoretical exponent 2 (O(N^2 D)) from the largest point: "
                f"{_fmt_s(f['search_s_at_imagenet_n2'])} s of search"
                if f.get("search_s_at_imagenet_n2")
                else ""
            )
            + f"; peak memory {f['peak_bytes_per_row']:.0f} B/row, extrapolated "
            f"{f['peak_bytes_at_imagenet_extrapolated'] / 2**30:.2f} GiB; recall@{k} {f['recall_at_largest_n']:.3f} "
            f"at N = {f['largest_n']:,}."
        )
    return "\n".join(lines) + "\n" + "\n".join(foot)


def scale_plot(rows, fits, path: str) -> None:
    """Total (build + search) seconds vs N on log-log axes per kind, the fits extended to ImageNet's N
    (dashed, extrapolation), and recall vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for i, kind in enumerate(fits):
        ok = [r for r in rows if r["kind"] == kind and "skipped" not in r]
        c = f"C{i}"
        ax.loglog([r["n"] for r in ok], [r["total_s"] for r in ok], "o-", color=c, label=f"{kind} (measured)")
        f = fits[kind]
        if f.get("total_exponent") is not None:
            a0 = f["total_s_at_imagenet_extrapolated"] / IMAGENET_N ** f["total_exponent"]
            xs = [f["n_range"][0], IMAGENET_N]
            ax.loglog(
                xs,
                [a0 * x ** f["total_exponent"] for x in xs],
                "--",
                color=c,
                lw=0.9,
                label=f"{kind} fit N^{f['total_exponent']:.2f} (extrapolated)",
            )
            ax.plot([IMAGENET_N], [f["total_s_at_imagenet_extrapolated"]], "*", color=c, ms=10)
        axr.semilogx([r["n"] for r in ok], [r["recall"] for r in ok], "o-", color=c, label=kind)
    ax.axvline(IMAGENET_N, color="k", lw=0.6, ls=":")
    ax.text(IMAGENET_N, ax.get_ylim()[0], " ImageNet", rotation=90, va="bottom", fontsize=8)
    ax.set(xlabel="N (rows of the graph)", ylabel="build + search seconds", title=f"kNN graph cost ({device_name()})")
    ax.legend(fontsize=7)
    axr.set(xlabel="N", ylabel="recall@k vs exact", ylim=(0, 1.02), title="recall")
    axr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bank(kind: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) unit rows: ``random`` (Gaussian, normalised) or ``clustered`` (around n/100 centres)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return F.normalize(torch.randn(n, d, generator=g), dim=1)
    centres = F.normalize(torch.randn(max(1, n // 100), d, generator=g), dim=1)
    label = torch.randint(0, len(centres), (n,), generator=g)
    return F.normalize(centres[label] + 0.6 / d**0.5 * torch.randn(n, d, generator=g), dim=1)


def ivf_recall(sizes, nprobes, d: int, k: int, sample: int, seed: int = 0, log=print):
    """Rows of recall@k of ivf against exact search, per bank kind, N and nprobe (``sample`` rows)."""
    rows = []
    for n in sizes:
        for kind in ("clustered", "random"):
            x = bank(kind, n, d, seed)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(sample, n)]
            exact = drop_rows(KNNIndex(x, "ip").search(x[pick], k + 1)[1].numpy(), pick.numpy(), k)
            t0 = time.perf_counter()
            index = KNNIndex(x, "ip", kind="ivf")
            build = time.perf_counter() - t0
            for nprobe in nprobes:
                index.index.nprobe = nprobe
                t0 = time.perf_counter()
                approx = drop_rows(index.search(x[pick], k + 1)[1].numpy(), pick.numpy(), k)
                per_row = (time.perf_counter() - t0) / len(pick)
                rows.append(
                    {
                        "bank": kind,
                        "n": n,
                        "d": d,
                        "k": k,
                        "nprobe": nprobe,
                        "sample": len(pick),
                        "recall": recall_at_k(approx, exact),
                        "build_s": build,
                        "graph_search_s": per_row * n,
                    }
                )
                log(f"{kind} N={n} nprobe={nprobe}: recall@{k} {rows[-1]['recall']:.3f}")
    return rows


def ivf_recall_table(rows) -> str:
    k, sample, d = rows[0]["k"], rows[0]["sample"], rows[0]["d"]
    lines = [f"| bank | N | nprobe | recall@{k} |", "|---|---|---|---|"]
    lines += [f"| {r['bank']} | {r['n']:,} | {r['nprobe']} | {r['recall']:.3f} |" for r in rows]
    return "\n".join(lines) + (
        f"\n\nivf (sqrt(N) lists) against exact search over {sample} sampled rows, D={d}, "
        f"self excluded; {device_name()}.  Times (in the JSON) come from the sample "
        "queries alone: the whole-graph costs are the scaling sweep's."
    )


def ivf_recall_main(a) -> int:
    k = a.k if a.k is not None else invp_graph_k()
    rows = ivf_recall(a.sizes or [80_000, 320_000], a.nprobes, a.d, k, a.sample, a.seed)
    table = ivf_recall_table(rows)
    print(table)
    print("written to", write_results("knn-ivf-recall", rows, table, a.out))
    return 0


def scale_main(a) -> int:
    k = a.k if a.k is not None else invp_graph_k()
    a.k = k
    sizes = a.sizes or list(SCALE_SIZES)
    t0 = time.perf_counter()
    rows = scale(sizes, a.kinds, a.d, k, a.max_seconds, a.sample, a.seed, nprobe=a.nprobe, ef_search=a.ef_search)
    fits = scale_fits(rows, a.fit_min_n)
    table = scale_table(rows, fits, a) + f"\n\nSweep wall time {time.perf_counter() - t0:.0f} s."
    print(table)
    out = write_results("knn-scale", rows, table, a.out)
    path = os.path.join(out, "knn-scale.json")
    with open(path) as f:
        doc = json.load(f)
    doc.update(
        fits=fits,
        k=k,
        d=a.d,
        max_seconds=a.max_seconds,
        sample=a.sample,
        imagenet_n=IMAGENET_N,
        nprobe=a.nprobe,
        ef_search=a.ef_search or 16,
    )
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    scale_plot(rows, fits, os.path.join(out, "knn-scale.png"))
    print("written to", out)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=None, help="neighbours (default: 5; with --scale, InvP's graph_k)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the repeats")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--out", default=None)
    p.add_argument("--scale", action="store_true", help="the scaling sweep over --sizes and --kinds")
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=None,
        help="--scale: the N values (default " + " ".join(map(str, SCALE_SIZES)) + ")",
    )
    p.add_argument("--kinds", nargs="+", choices=SCALE_KINDS, default=list(SCALE_KINDS), help="--scale: index kinds")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="--scale: skip a point whose build + search time, estimated from the previous points, is over this",
    )
    p.add_argument("--sample", type=int, default=2000, help="--scale: rows for recall where the exact graph is skipped")
    p.add_argument("--fit-min-n", type=int, default=0, help="--scale: fit the growth law over N >= this only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nprobe", type=int, default=16, help="--scale: ivf lists searched (KNNIndex's default 16)")
    p.add_argument("--ef-search", type=int, default=None, help="--scale: hnsw efSearch (default FAISS's 16)")
    p.add_argument("--ivf-recall", action="store_true", help="recall of ivf on random and clustered banks")
    p.add_argument("--nprobes", nargs="+", type=int, default=[16, 64], help="--ivf-recall: nprobe values")
    p.add_argument("--point", nargs=6, metavar=("KIND", "N", "D", "K", "SEED", "OUT_NPY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.point:  # one point of the sweep, in its own process (its peak memory is its own)
        kind, n, d, k, seed, out_npy = a.point
        res = measure_point(kind, int(n), int(d), int(k), int(seed), out_npy, a.nprobe, a.ef_search)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.scale:
        return scale_main(a)
    if a.ivf_recall:
        return ivf_recall_main(a)
    a.k = 5 if a.k is None else a.k
    rows = run(a.n, a.d, a.k, a.repeats, a.impls, a.warmup)
    lines = [
        "| implementation | N | D | k | seconds (median) | min | max | vs torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['impl']} | {r['n']} | {r['d']} | {r['k']} | failed: {r['error'].replace('|', '/')} | - | - | - |"
            )
            continue
        vs = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-"
        lines.append(
            f"| {r['impl']} | {r['n']} | {r['d']} | {r['k']} | {r['seconds_median']:.3f} | "
            f"{r['seconds_min']:.3f} | {r['seconds_max']:.3f} | {vs} |"
        )
    table = (
        "\n".join(lines)
        + f"\n\nkNN graph of {a.n} unit vectors (all rows queried), {a.repeats} repeats"
        + (
            "."
            if a.warmup == 1
            else f" after {a.warmup} warm-up runs."
            if a.warmup
            else ", no warm-up run (the first includes start-up)."
        )
    )
    ok = [r for r in rows if "error" not in r]
    publish(
        "knn",
        rows,
        table,
        a.out,
        [r["impl"] for r in ok],
        [r.get("speedup_vs_torch") or 0.0 for r in ok],
        "speed vs torch brute force",
        f"kNN graph, N={a.n}",
    )
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
