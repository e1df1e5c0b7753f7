"""kNN-graph building (every row's k nearest other rows, inner product on unit vectors):
FAISS (GPU index where present, else CPU) vs torch brute force vs scikit-learn, one run.

    python -m benchmarks.knn [--n 20000] [--d 128] [--k 5] [--repeats 3] [--warmup 1]
                             [--impls faiss-flat torch sklearn faiss-hnsw]

``--impls`` picks the implementations (e.g. ``--impls faiss-flat torch --n 1281167`` for the
ImageNet-size graph, where scikit-learn and the CPU HNSW build would take far too long); the
baseline is torch brute force (on the GPU where present).  An implementation that fails (e.g.
out of memory) gives an error row, not a crash.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import publish, timed  # noqa: E402
from fastssl.knn import KNNIndex, gpu_count  # noqa: E402


IMPLS = ("faiss-flat", "torch", "sklearn", "faiss-hnsw")


def torch_graph(x, k, chunk=None):
    """Each row's k + 1 largest inner products (itself included), in row chunks of at most
    2^30 similarities (4,096 rows up to N = 262,144)."""
    chunk = chunk or max(256, min(4096, 2 ** 30 // max(1, len(x))))
    out = []
    for s in range(0, len(x), chunk):
        out.append((x[s:s + chunk] @ x.t()).topk(k + 1, dim=1).indices)
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
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        rows.append({"impl": name, "n": n, "d": d, "k": k, "seconds_median": sorted(ts)[len(ts) // 2],
                     "seconds_min": min(ts), "seconds_max": max(ts)})
        print(f"  knn {name:24s} {rows[-1]['seconds_median']:.3f}s", flush=True)
    base = next((r for r in rows if r["impl"].startswith("torch") and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["speedup_vs_torch"] = base["seconds_median"] / r["seconds_median"] if base else None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the repeats")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = run(a.n, a.d, a.k, a.repeats, a.impls, a.warmup)
    lines = ["| implementation | N | D | k | seconds (median) | min | max | vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['k']} | failed: {r['error'].replace('|', '/')} | - | - | - |")
            continue
        vs = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-"
        lines.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['k']} | {r['seconds_median']:.3f} | "
                     f"{r['seconds_min']:.3f} | {r['seconds_max']:.3f} | {vs} |")
    table = "\n".join(lines) + f"\n\nkNN graph of {a.n} unit vectors (all rows queried), {a.repeats} repeats" + (
        "." if a.warmup == 1 else f" after {a.warmup} warm-up runs." if a.warmup else
        ", no warm-up run (the first includes start-up).")
    ok = [r for r in rows if "error" not in r]
    publish("knn", rows, table, a.out, [r["impl"] for r in ok], [r.get("speedup_vs_torch") or 0.0 for r in ok],
            "speed vs torch brute force", f"kNN graph, N={a.n}")
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
