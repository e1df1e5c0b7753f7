"""Fused loss kernels vs eager PyTorch vs torch.compile'd eager, each loss in isolation.

    python -m benchmarks.kernels            # GPU: the full sweep
    python -m benchmarks.kernels --tiny     # any machine: a few small sizes (CPU: Triton interpreter)

For every loss and size: forward+backward time (median, min, max), peak memory above the
inputs, the ratio of each implementation to eager, and the fused kernel's achieved fraction of
the FLOP and memory-bandwidth ceilings, both measured in the same run (a large bf16/fp32 matrix
product and a device-to-device copy).  Writes kernels.json, kernels.md and kernels.png under
benchmarks/results/<device>/ (or --out).  On a CPU, timings are of the interpreter and only
show that the script works: the report says so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import device_name, write_results  # noqa: E402
from fastssl.kernels.sc_loss import sc_loss_eager, sc_loss_fused  # noqa: E402
from fastssl.kernels.triplet import triplet_loss_eager, triplet_loss_fused  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def triplet_hard(fn):
    return lambda a, p, n: fn(a, p, n, margin=0.5, distance="euclidean", hardest=True)


LOSSES = {
    # name: (fused, eager, inputs(B, D, dtype), flops(B, D) of the fused fwd+bwd, min bytes(B, D, elem))
    "sc": (sc_loss_fused, sc_loss_eager, lambda B, D, dt: [torch.randn(B, D, device=DEV, dtype=dt) for _ in range(2)],
           lambda B, D: 2 * B * B * D * 5, lambda B, D, e: 4 * B * D * e),
    "triplet-hardest": (triplet_hard(triplet_loss_fused), triplet_hard(triplet_loss_eager),
                        lambda B, D, dt: [torch.randn(B, D, device=DEV, dtype=dt) for _ in range(3)],
                        lambda B, D: 2 * B * 2 * B * D, lambda B, D, e: 6 * B * D * e),
}


def time_it(fn, repeats):
    def once():
        if CUDA:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()  # warm-up (compilation)
    ts = [once() for _ in range(repeats)]
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def fwd_bwd(fn, inputs):
    xs = [x.detach().requires_grad_() for x in inputs]

    def go():
        loss = fn(*xs)
        loss.backward()
    return go


def peak_mem(fn, inputs):
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(fn, inputs)()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def ceilings():
    """Measured peak FLOP/s (bf16 and fp32 matmul) and bandwidth (device copy), this run."""
    if not CUDA:
        return {}
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(8192, 8192, device=DEV, dtype=dt)
        t = time_it(lambda: a @ a, 10)["median_ms"] / 1e3
        out[f"matmul_{str(dt).split('.')[-1]}_tflops"] = 2 * 8192 ** 3 / t / 1e12
    x = torch.empty(2 ** 30, device=DEV, dtype=torch.uint8)
    t = time_it(lambda: x.clone(), 10)["median_ms"] / 1e3
    out["copy_tb_s"] = 2 * x.numel() / t / 1e12
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a few small sizes (runs on CPU under the interpreter)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile'd eager")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not CUDA and not a.tiny:
        print("benchmarks.kernels: no CUDA GPU here; the full sweep needs one (use --tiny to check the script)")
        return 0
    sizes = [(64, 32), (96, 64)] if a.tiny else [(b, d) for b in (256, 1024, 4096, 16384) for d in (64, 128, 512)]
    dtypes = [torch.float32] if a.tiny else [torch.bfloat16, torch.float32]
    repeats = 2 if a.tiny else a.repeats
    use_compile = not (a.no_compile or a.tiny)
    ceil = ceilings()
    rows = []
    for name, (fused, eager, make, flops, nbytes) in LOSSES.items():
        impls = {"fused": fused, "eager": eager}
        if use_compile:
            impls["compiled"] = torch.compile(eager)
        for dt in dtypes:
            for B, D in sizes:
                inputs = make(B, D, dt)
                row = {"loss": name, "B": B, "D": D, "dtype": str(dt).split(".")[-1]}
                for impl, fn in impls.items():
                    try:
                        row[impl] = time_it(fwd_bwd(fn, inputs), repeats)
                        row[impl]["peak_mem_bytes"] = peak_mem(fn, inputs)
                    except torch.OutOfMemoryError:
                        row[impl] = {"oom": True}
                        torch.cuda.empty_cache()
                e = row["eager"].get("median_ms")
                for impl in impls:
                    m = row[impl].get("median_ms")
                    row[impl]["speedup_vs_eager"] = e / m if (e and m) else None
                if CUDA and "median_ms" in row["fused"]:
                    t = row["fused"]["median_ms"] / 1e3
                    peak = ceil["matmul_bfloat16_tflops" if dt == torch.bfloat16 else "matmul_float32_tflops"]
                    row["fused"]["flop_fraction"] = flops(B, D) / t / 1e12 / peak
                    row["fused"]["bandwidth_fraction"] = nbytes(B, D, inputs[0].element_size()) / t / 1e12 / ceil["copy_tb_s"]
                rows.append(row)
                print(f"  {name:16s} B={B:6d} D={D:4d} {row['dtype']:9s} " + "  ".join(
                    f"{i}={row[i].get('median_ms', float('nan')):.3f}ms" for i in impls), flush=True)
    table = render(rows, list(impls), ceil, a.tiny)
    print(table)
    out = write_results("kernels", rows, table, a.out)
    plot(rows, os.path.join(out, "kernels.png"))
    print("written to", out)
    return 0


def _mb(x):
    return "-" if x is None else f"{x / 2 ** 20:.1f}"


def render(rows, impls, ceil, tiny):
    head = "| loss | B | D | dtype | " + " | ".join(f"{i} ms" for i in impls) + \
           " | fused vs eager | fused vs compiled | peak MiB fused / eager | fused FLOP frac. | fused BW frac. |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = " | ".join(f"{r[i].get('median_ms', float('nan')):.3f}" if "median_ms" in r[i] else "OOM" for i in impls)
        f = r["fused"]
        vs_c = (f"{r['compiled']['median_ms'] / f['median_ms']:.2f}x" if "compiled" in r and "median_ms" in r["compiled"]
                and "median_ms" in f else "-")
        sp = f"{f['speedup_vs_eager']:.2f}x" if f.get("speedup_vs_eager") else "-"
        lines.append(f"| {r['loss']} | {r['B']} | {r['D']} | {r['dtype']} | {ms} | {sp} | {vs_c} | "
                     f"{_mb(f.get('peak_mem_bytes'))} / {_mb(r['eager'].get('peak_mem_bytes'))} | "
                     f"{f.get('flop_fraction', float('nan')):.2f} | {f.get('bandwidth_fraction', float('nan')):.2f} |")
    note = ("\nTiny mode on a CPU: the fused kernels ran under the Triton interpreter, so these timings say "
            "nothing about speed.\n" if tiny and not CUDA else "")
    ce = ", ".join(f"{k} {v:.1f}" for k, v in ceil.items())
    return "\n".join(lines) + f"\n{note}\nDevice: {device_name()}. Measured ceilings: {ce or 'n/a'}.\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in rows})
    fig, axes = plt.subplots(1, len(losses), figsize=(6 * len(losses), 4), squeeze=False)
    for ax, name in zip(axes[0], losses):
        for impl in ("fused", "eager", "compiled"):
            pts = [(r["B"], r[impl]["median_ms"]) for r in rows if r["loss"] == name and impl in r
                   and "median_ms" in r[impl] and r["D"] == max(x["D"] for x in rows if x["loss"] == name)
                   and r["dtype"] == rows[0]["dtype"]]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch B", ylabel="fwd+bwd ms", title=f"{name} ({device_name()})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
