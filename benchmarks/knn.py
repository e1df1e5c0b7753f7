"""kNN-graph building (every row's k nearest other rows, inner product on unit vectors):
FAISS (GPU index where present, else CPU) vs torch brute force vs scikit-learn, one run.

    python -m benchmarks.knn [--n 20000] [--d 128] [--k 5] [--repeats 3]
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


def torch_graph(x, k, chunk=4096):
    out = []
    for s in range(0, len(x), chunk):
        out.append((x[s:s + chunk] @ x.t()).topk(k + 1, dim=1).indices)
    return torch.cat(out)


def sklearn_graph(x, k):
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x.cpu().numpy())
    return nn_.kneighbors(x.cpu().numpy(), return_distance=False)  # unit vectors: L2 order = IP order


def run(n, d, k, repeats):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1).to(dev)
    impls = {
        f"faiss-flat ({'gpu' if gpu_count() else 'cpu'})": lambda: KNNIndex(x, "ip").search(x, k + 1),
        f"torch brute force ({dev})": lambda: torch_graph(x, k),
        "scikit-learn (cpu)": lambda: sklearn_graph(x, k),
        "faiss-hnsw (cpu)": lambda: KNNIndex(x, "ip", kind="hnsw").search(x, k + 1),
    }
    rows = []
    for name, fn in impls.items():
        ts = timed(fn, repeats)
        rows.append({"impl": name, "n": n, "d": d, "k": k, "seconds_median": sorted(ts)[len(ts) // 2],
                     "seconds_min": min(ts), "seconds_max": max(ts)})
        print(f"  knn {name:24s} {rows[-1]['seconds_median']:.3f}s", flush=True)
    base = next(r for r in rows if r["impl"].startswith("torch"))["seconds_median"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["seconds_median"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = run(a.n, a.d, a.k, a.repeats)
    lines = ["| implementation | N | D | k | seconds (median) | min | max | vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['k']} | {r['seconds_median']:.3f} | "
                     f"{r['seconds_min']:.3f} | {r['seconds_max']:.3f} | {r['speedup_vs_torch']:.2f}x |")
    table = "\n".join(lines) + f"\n\nkNN graph of {a.n} unit vectors (all rows queried), {a.repeats} repeats."
    publish("knn", rows, table, a.out, [r["impl"] for r in rows], [r["speedup_vs_torch"] for r in rows],
            "speed vs torch brute force", f"kNN graph, N={a.n}")


if __name__ == "__main__":
    main()
