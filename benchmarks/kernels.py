"""Fused loss kernels vs eager PyTorch, the GEMM-form baseline and torch.compile'd eager (and
pykeops for the SC loss, where it is installed), each loss in isolation.

    python -m benchmarks.kernels            # GPU: the full sweep
    python -m benchmarks.kernels --sizes headline   # GPU: SC / triplet at B=4,096 D=128; InvP bank
                                            # B=256 K=4,096 D=128 over N = 65,536 .. 1,281,167
    python -m benchmarks.kernels --losses sc --b 1024 4096 --d 128 --dtypes bfloat16
    python -m benchmarks.kernels --tiny     # any machine: a few small sizes (CPU: Triton interpreter)

Implementations: ``fused`` (the Triton kernel), ``eager`` (its twin, the reference: fp32
maths), ``gemm`` (the strongest plain PyTorch: the distances or logits as one matrix product in
the inputs' dtype, ``cdist(..., compute_mode="use_mm_for_euclid_dist")`` for SC and the
triplet mining, ``x @ bank.T`` + ``topk`` for the bank), ``compiled`` (torch.compile of eager).
Precisions: bfloat16, float16, float32, and tf32 (fp32 inputs, the fused kernels on the TF32
tensor cores: the InvP bank's default in mixed-precision runs).

For every loss and size: forward+backward time (median, min, max), peak memory above the
inputs, each implementation against eager and the fused kernel against GEMM form and compiled,
the fused kernel's fraction of the FLOP and bandwidth ceilings (a large matrix product and a
device-to-device copy, measured in the same run), for the InvP bank also the scan alone (the
streaming top-K pass: the bank's bytes / its time, against the copy), and whether the fused
values and gradients equal eager's at that size (per-tensor relative error, the one-time check's
tolerances; the exit status is 1 when one does not).  Writes kernels.json, kernels.md and
kernels.png under benchmarks/results/<device>/ (or --out).  On a CPU, timings are of the
interpreter and only show that the script works: the report says so.

An implementation that fails at a size (e.g. torch.compile without a working compiler) gives an
error cell and a note under the table, not a crash, and is not tried again for that loss.  At
the headline sizes torch.compile runs first (a time limit must not cut its slow compile),
otherwise last; the JSON and markdown are rewritten after every row, so a run cut short keeps
what it measured.
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

from benchmarks.common import device_name, emit, write_results  # noqa: E402
from fastssl.kernels.bank_loss import bank_loss_fused, bank_lse  # noqa: E402
from fastssl.kernels.sc_loss import sc_loss_fused  # noqa: E402
from fastssl.kernels.selfcheck import TOL  # noqa: E402
from fastssl.kernels.triplet import triplet_loss_fused  # noqa: E402
from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager, invp_losses  # noqa: E402
from fastssl.losses.sc_loss import sc_loss_eager  # noqa: E402
from fastssl.losses.triplet import triplet_loss_eager  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def triplet_hard(fn):
    return lambda a, p, n: fn(a, p, n, margin=0.5, distance="euclidean", hardest=True)


def invp_bank(fn, K, **kw):
    """InvP's loss on a bank: L_ins + 0.6 L_inv (rows with positives), hard positives P = 20."""

    def loss(f, bank, index, pos):
        l_ins, l_inv = fn(
            f, bank, index, pos, BankLossSettings(temperature=0.07, background=K, hard_positives=20), **kw
        )
        return l_ins.mean() + 0.6 * l_inv.nan_to_num(0.0).mean()

    return loss


def bank_loss_gemm(f, bank, index, pos, settings):
    """The strongest plain-PyTorch form: one GEMM in the bank's dtype (tensor cores for bf16, and
    TF32 where torch allows it), then ``topk`` and the same per-row terms; the B x N logits exist."""
    logits = (f.to(bank.dtype) @ bank.t()).float() / settings.temperature
    return invp_losses(logits, index, pos, settings.background, settings.hard_positives)


def sc_loss_gemm(f1, f2):
    """The SC loss with distances in GEMM form (``cdist``'s matrix-product mode, fp32)."""
    a, b = f1.float(), f2.float()
    d = torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")
    return ((-d).logsumexp(dim=1) + (a - b).norm(dim=1)).mean()


def triplet_gemm(a, p, n):
    """The hardest-negative triplet loss with the anchor-candidate distances in GEMM form (the
    mining); the loss on the gathered rows, as the eager twin."""
    c = torch.cat([p, n]).float()
    d = torch.cdist(a.float(), c, compute_mode="use_mm_for_euclid_dist")
    d[torch.arange(len(a)), torch.arange(len(a))] = float("inf")  # an anchor's own positive is not a negative
    d_ap, d_an = (a.float() - p.float()).norm(dim=1), (a.float() - c[d.argmin(1)]).norm(dim=1)
    return torch.relu(d_ap - d_an + 0.5).mean()


def scan_only(_, K, tf32):
    """InvP's bank scan alone (forward: the streaming pass, no loss algebra or gradient)."""
    return lambda f, bank, index, pos: bank_lse(f, bank, 0.07, K, tf32=tf32)[0]


def sc_loss_keops(f1, f2):
    """The SC loss on pykeops (where installed): symbolic B x B distances, reduced on the fly."""
    from pykeops.torch import LazyTensor

    a, b = f1.float(), f2.float()
    d = ((LazyTensor(a[:, None, :]) - LazyTensor(b[None, :, :])) ** 2).sum(-1).sqrt()
    return ((-d).logsumexp(dim=1).view(-1) + (a - b).norm(dim=1)).mean()


def have_keops() -> bool:
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


def unit(*shape, dt):
    return torch.nn.functional.normalize(torch.randn(*shape, device=DEV), dim=-1).to(dt)


def bank_inputs(s, dt):
    """A batch against a bank it belongs to (the first B entries), 84 propagated positives each."""
    bank = unit(s["N"], s["D"], dt=dt)
    f = (bank[: s["B"]].float() + 0.5 * unit(s["B"], s["D"], dt=torch.float32)).to(dt)
    return [f, bank, torch.arange(s["B"], device=DEV), torch.randint(0, s["N"], (s["B"], 84), device=DEV)]


def pair_sizes(tiny):
    return (
        [dict(B=64, D=32), dict(B=96, D=64)]
        if tiny
        else [dict(B=b, D=d) for b in (256, 1024, 4096, 16384) for d in (64, 128, 512)]
    )


def bank_sizes(tiny):
    return (
        [dict(B=16, N=3000, D=32, K=64)]
        if tiny
        else [dict(B=256, N=n, D=128, K=4096) for n in (65536, 262144, 1281167)]
        + [dict(B=256, N=1281167, D=d, K=4096) for d in (64, 512)]
        + [dict(B=1024, N=1281167, D=128, K=4096)]
    )


LOSSES = {
    # name: fused, eager, sizes(tiny), inputs(size, dtype), how many inputs are differentiated,
    #       FLOPs of the fused fwd+bwd(size), least bytes it must move(size, element size)
    "sc": dict(
        fused=sc_loss_fused,
        fused_tf32=lambda f1, f2: sc_loss_fused(f1, f2, True),
        eager=sc_loss_eager,
        gemm=sc_loss_gemm,
        keops=sc_loss_keops,
        sizes=pair_sizes,
        make=lambda s, dt: [torch.randn(s["B"], s["D"], device=DEV, dtype=dt) for _ in range(2)],
        grads=2,
        flops=lambda s: 2 * s["B"] ** 2 * s["D"] * 5,
        bytes=lambda s, e: 4 * s["B"] * s["D"] * e,
    ),
    "triplet-hardest": dict(
        fused=triplet_hard(triplet_loss_fused),
        fused_tf32=lambda a, p, n: triplet_loss_fused(a, p, n, margin=0.5, hardest=True, tf32=True),
        eager=triplet_hard(triplet_loss_eager),
        gemm=triplet_gemm,
        sizes=pair_sizes,
        grads=3,
        make=lambda s, dt: [torch.randn(s["B"], s["D"], device=DEV, dtype=dt) for _ in range(3)],
        flops=lambda s: 2 * s["B"] * 2 * s["B"] * s["D"],
        bytes=lambda s, e: 6 * s["B"] * s["D"] * e,
    ),
    # the bank loss's floor is one pass over the bank (its FLOPs: the B x N logits, once)
    "invp-bank": dict(
        fused=lambda *x: invp_bank(bank_loss_fused, x[-1])(*x[:-1]),
        fused_tf32=lambda *x: invp_bank(bank_loss_fused, x[-1], tf32=True)(*x[:-1]),
        eager=lambda *x: invp_bank(bank_loss_eager, x[-1])(*x[:-1]),
        gemm=lambda *x: invp_bank(bank_loss_gemm, x[-1])(*x[:-1]),
        scan=lambda *x: scan_only(None, x[-1], False)(*x[:-1]),
        scan_tf32=lambda *x: scan_only(None, x[-1], True)(*x[:-1]),
        sizes=bank_sizes,
        grads=1,
        make=lambda s, dt: bank_inputs(s, dt) + [s["K"]],
        flops=lambda s: 2 * s["B"] * s["N"] * s["D"],
        bytes=lambda s, e: s["N"] * s["D"] * e,
    ),
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


def fwd_bwd(fn, inputs, grads):
    xs = [x.detach().requires_grad_() if i < grads else x for i, x in enumerate(inputs)]

    def go():
        loss = fn(*xs)
        if grads:
            loss.backward()
        return loss, [x.grad for x in xs[:grads]]

    return go


def check_values(spec, inputs, fused, tol):
    """The fused kernel against the eager twin at this size: max |fused - eager| / max |eager|
    over the value and each gradient (each tensor on its own), and whether it is within ``tol``."""
    outs = []
    for fn in (fused, spec["eager"]):
        loss, grads = fwd_bwd(fn, inputs, spec["grads"])()
        outs.append([loss.detach().float(), *[g.float() for g in grads]])
    err = 0.0
    for a, b in zip(*outs):
        scale = b.abs().max().item()
        err = max(err, (a - b).abs().max().item() / (scale if scale > 0 else 1.0))
    return {"max_rel_err": err, "tol": tol, "ok": bool(err <= tol)}


def peak_mem(fn, inputs, grads):
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(fn, inputs, grads)()
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
        out[f"matmul_{str(dt).split('.')[-1]}_tflops"] = 2 * 8192**3 / t / 1e12
    x = torch.empty(2**30, device=DEV, dtype=torch.uint8)
    t = time_it(lambda: x.clone(), 10)["median_ms"] / 1e3
    out["copy_tb_s"] = 2 * x.numel() / t / 1e12
    return out


def sizes_of(name, a):
    """The sizes of loss ``name``: the preset's (tiny / sweep / headline), or built from --b/--d/--n/--bank-b/--k."""
    preset = a.sizes or ("tiny" if a.tiny else "sweep")
    tiny = preset == "tiny"
    if name == "invp-bank":
        base = (
            [dict(B=256, N=n, D=128, K=4096) for n in (65536, 262144, 1281167)]
            if preset == "headline"
            else bank_sizes(tiny)
        )
        if not (a.n or a.d or a.bank_b or a.k):
            return base
        return [
            dict(B=a.bank_b or base[0]["B"], N=n, D=d, K=a.k or base[0]["K"])
            for d in (a.d or [base[0]["D"]])
            for n in (a.n or sorted({s["N"] for s in base}))
        ]
    base = [dict(B=4096, D=128)] if preset == "headline" else pair_sizes(tiny)
    if not (a.b or a.d):
        return base
    return [
        dict(B=b, D=d) for b in (a.b or sorted({s["B"] for s in base})) for d in (a.d or sorted({s["D"] for s in base}))
    ]


def _why(e: BaseException) -> str:
    msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {msg}"[:200]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a few small sizes (runs on CPU under the interpreter)")
    p.add_argument(
        "--sizes",
        choices=("tiny", "sweep", "headline"),
        default=None,
        help="size preset (default: sweep, or tiny with --tiny)",
    )
    p.add_argument("--b", type=int, nargs="+", help="batch sizes of the SC and triplet losses")
    p.add_argument("--d", type=int, nargs="+", help="feature dimensions (all losses)")
    p.add_argument("--n", type=int, nargs="+", help="bank sizes N of the InvP bank loss")
    p.add_argument("--bank-b", type=int, default=None, help="batch size of the InvP bank loss (preset: 256)")
    p.add_argument("--k", type=int, default=None, help="top-K of the InvP bank loss (preset: 4096)")
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=("bfloat16", "float16", "float32", "tf32"),
        default=None,
        help="input precisions (tf32: fp32 inputs, the fused kernels on the TF32 tensor cores); "
        "default: bfloat16 float32 tf32 (float32 with --tiny)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile'd eager")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: no measurement starts after this (the rest: 'not run' cells)",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    deadline = time.perf_counter() + a.time_budget if a.time_budget else None
    tiny = a.tiny or a.sizes == "tiny"
    if not CUDA and not tiny:
        print("benchmarks.kernels: no CUDA GPU here; the full sweep needs one (use --tiny to check the script)")
        return 0
    precisions = a.dtypes or (["float32"] if tiny else ["bfloat16", "float32", "tf32"])
    repeats = 2 if a.tiny else a.repeats
    use_compile = not (a.no_compile or a.tiny)
    ceil = ceilings()
    # fused, the GEMM-form baseline and eager (and pykeops; the InvP bank scan alone) for every
    # size, and torch.compile'd eager: first at the headline sizes (so that a time limit cannot cut
    # it), last otherwise (its compile time would hold up the rest of a sweep)
    measured = ["fused", "gemm", "eager", "scan"] + (["keops"] if have_keops() and not tiny else [])
    phases = [measured] + ([["compiled"]] if use_compile else [])
    if a.sizes == "headline":
        phases.reverse()
    rows, by_key, broken, compiled = [], {}, {}, {}
    out = None
    for phase in phases:
        for name in a.losses:
            spec = LOSSES[name]
            for prec in precisions:
                dt, tf32 = (torch.float32, True) if prec == "tf32" else (getattr(torch, prec), False)
                for size in sizes_of(name, a):
                    key = (name, prec, tuple(sorted(size.items())))
                    if key not in by_key:
                        by_key[key] = {"loss": name, **size, "dtype": prec}
                        rows.append(by_key[key])
                    row = by_key[key]
                    impls = [i for i in phase if i in spec or (i == "compiled")]
                    if deadline is not None and time.perf_counter() > deadline:
                        for impl in impls:
                            row[impl] = {"error": "not run: --time-budget spent"}
                        continue
                    torch.manual_seed(0)
                    try:
                        inputs = spec["make"](size, dt)
                    except torch.OutOfMemoryError:
                        for impl in impls:
                            row[impl] = {"oom": True}
                        torch.cuda.empty_cache()
                        continue
                    for impl in impls:
                        if (name, impl) in broken:
                            row[impl] = {"error": f"not run: failed at {broken[(name, impl)]}"}
                            continue
                        if deadline is not None and time.perf_counter() > deadline:
                            row[impl] = {"error": "not run: --time-budget spent"}
                            continue
                        try:
                            if impl == "compiled":
                                fn = compiled.setdefault(name, torch.compile(spec["eager"]))
                            else:
                                fn = spec[f"{impl}_tf32" if tf32 and f"{impl}_tf32" in spec else impl]
                            grads = 0 if impl == "scan" else spec["grads"]
                            row[impl] = time_it(fwd_bwd(fn, inputs, grads), repeats)
                            row[impl]["peak_mem_bytes"] = peak_mem(fn, inputs, grads)
                            if impl == "fused":  # values checked at the size measured
                                row["check"] = check_values(spec, inputs, fn, TOL[prec_key(prec)])
                        except torch.OutOfMemoryError:
                            row[impl] = {"oom": True}
                        except Exception as e:  # one implementation failing gives an error cell, not a crash
                            row[impl] = {"error": _why(e)}
                            broken[(name, impl)] = f"{size_label(row)} {row['dtype']}"
                            print(f"  {name} {impl}: {row[impl]['error']}", file=sys.stderr, flush=True)
                        if CUDA:
                            torch.cuda.empty_cache()
                    del inputs
                    ratios(row, spec, size, dt, ceil)
                    print(
                        f"  {name:16s} {size_label(row):28s} {row['dtype']:9s} "
                        + "  ".join(f"{i}={row[i].get('median_ms', float('nan')):.3f}ms" for i in impls if i in row)
                        + (f"  check {row['check']['max_rel_err']:.1e}" if "check" in row else ""),
                        flush=True,
                    )
                    emit(row)
                    out = write_results("kernels", rows, render(rows, impls_of(rows), ceil, tiny), a.out)
    table = render(rows, impls_of(rows), ceil, tiny)
    print(table)
    out = write_results("kernels", rows, table, a.out)
    plot(rows, os.path.join(out, "kernels.png"))
    print("written to", out)
    bad = [r for r in rows if not r.get("check", {}).get("ok", True)]
    for r in bad:
        print(
            f"benchmarks.kernels: fused differs from eager at {r['loss']} {size_label(r)} {r['dtype']}", file=sys.stderr
        )
    return 1 if bad else 0


def prec_key(prec: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "tf32": "tf32"}[prec]


IMPLS = ("fused", "gemm", "eager", "compiled", "keops")


def impls_of(rows):
    return [i for i in IMPLS if any(i in r for r in rows)]


def ratios(row, spec, size, dt, ceil):
    """Each implementation's speed-up over eager and the fused kernel's FLOP / bandwidth fractions."""
    e = row.get("eager", {}).get("median_ms")
    for impl in impls_of([row]):
        m = row[impl].get("median_ms")
        row[impl]["speedup_vs_eager"] = e / m if (e and m) else None
    element = torch.empty((), dtype=dt).element_size()
    if CUDA and "median_ms" in row.get("fused", {}):
        t = row["fused"]["median_ms"] / 1e3
        peak = ceil["matmul_bfloat16_tflops" if dt == torch.bfloat16 else "matmul_float32_tflops"]
        row["fused"]["flop_fraction"] = spec["flops"](size) / t / 1e12 / peak
        row["fused"]["bandwidth_fraction"] = spec["bytes"](size, element) / t / 1e12 / ceil["copy_tb_s"]
    if "median_ms" in row.get("scan", {}):  # one pass over the bank: its bytes / time
        tb_s = size["N"] * size["D"] * element / (row["scan"]["median_ms"] / 1e3) / 1e12
        row["scan"]["tb_s"] = tb_s
        row["scan"]["bandwidth_fraction"] = tb_s / ceil["copy_tb_s"] if CUDA else None


def _mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def size_label(r):
    return " ".join(f"{k}={r[k]}" for k in ("B", "N", "D", "K") if k in r)


def _cell(r, i):
    if i not in r:
        return "-"
    c = r[i]
    if "median_ms" in c:
        return f"{c['median_ms']:.3f}"
    return "OOM" if c.get("oom") else "not run" if c.get("error", "").startswith("not run:") else "error"


def render(rows, impls, ceil, tiny):
    head = (
        "| loss | size | dtype | "
        + " | ".join(f"{i} ms" for i in impls)
        + " | fused vs eager | fused vs GEMM form | fused vs compiled | peak MiB fused / eager | fused FLOP frac. "
        "| fused BW frac. | bank scan TB/s (frac.) | fused = eager |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    errors = []
    for r in rows:
        ms = " | ".join(_cell(r, i) for i in impls)
        f, e = r.get("fused", {}), r.get("eager", {})
        vs_c, vs_g = (
            f"{r[i]['median_ms'] / f['median_ms']:.2f}x" if "median_ms" in r.get(i, {}) and "median_ms" in f else "-"
            for i in ("compiled", "gemm")
        )
        sp = f"{f['speedup_vs_eager']:.2f}x" if f.get("speedup_vs_eager") else "-"
        sc = r.get("scan", {})
        scan = (
            f"{sc['tb_s']:.3f}" + (f" ({sc['bandwidth_fraction']:.2f})" if sc.get("bandwidth_fraction") else "")
            if "tb_s" in sc
            else "-"
        )
        chk = r.get("check")
        same = "-" if chk is None else f"{'yes' if chk['ok'] else 'NO'} ({chk['max_rel_err']:.0e})"
        lines.append(
            f"| {r['loss']} | {size_label(r)} | {r['dtype']} | {ms} | {sp} | {vs_g} | {vs_c} | "
            f"{_mb(f.get('peak_mem_bytes'))} / {_mb(e.get('peak_mem_bytes'))} | "
            f"{f.get('flop_fraction', float('nan')):.2f} | {f.get('bandwidth_fraction', float('nan')):.2f} | "
            f"{scan} | {same} |"
        )
        errors += [
            f"* {i} at {r['loss']} {size_label(r)} {r['dtype']}: {r[i]['error']}"
            for i in impls
            if "error" in r.get(i, {}) and not r[i]["error"].startswith("not run:")
        ]
    note = (
        "\nTiny mode on a CPU: the fused kernels ran under the Triton interpreter, so these timings say "
        "nothing about speed.\n"
        if tiny and not CUDA
        else ""
    )
    errs = (
        "\nErrors (the implementation was not tried again for that loss):\n" + "\n".join(errors) + "\n"
        if errors
        else ""
    )
    if any(c.get("error") == "not run: --time-budget spent" for r in rows for c in r.values() if isinstance(c, dict)):
        errs += "\n'not run': the run's --time-budget was spent before that measurement.\n"
    ce = ", ".join(f"{k} {v:.1f}" for k, v in ceil.items())
    return "\n".join(lines) + f"\n{note}{errs}\nDevice: {device_name()}. Measured ceilings: {ce or 'n/a'}.\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in rows})
    fig, axes = plt.subplots(1, len(losses), figsize=(6 * len(losses), 4), squeeze=False)
    for ax, name in zip(axes[0], losses):
        mine = [r for r in rows if r["loss"] == name]
        ref, x = mine[0], "N" if "N" in mine[0] else "B"  # the sweep through the first size
        for impl in IMPLS:
            pts = [
                (r[x], r[impl]["median_ms"])
                for r in mine
                if impl in r
                and "median_ms" in r[impl]
                and all(r[k] == ref[k] for k in ("B", "N", "D", "K", "dtype") if k in r and k != x)
            ]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="bank N" if x == "N" else "batch B",
            ylabel="fwd+bwd ms",
            title=f"{name} ({device_name()})",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
