"""Every fused-kernel configuration the launchers can use, compiled for a GPU target without a
GPU: shared memory against the target's per-block limit, registers and stack (spills), and
whether the PTX uses the tensor cores.

    python -m fastssl.kernels.compiled [--arch 90 80] [--markdown] [--json PATH]

Triton compiles for ``GPUTarget("cuda", arch, 32)`` with its bundled ptxas; the bundled
``cuobjdump -res-usage`` reads the registers and the stack frame (a frame above zero means
spilled registers) off the cubin.  Each kernel file's ``configs(dtype, tf32)`` is the one place
the launchers read their tiles from (one configuration per input precision, D tiled).  What a
launch compiles also depends on its arguments: Triton specialises every integer argument
divisible by 16 and every pointer aligned to 16 B, and those variants differ in registers and
spills.  So the rows are not written by hand: the launchers themselves run on CPU tensors at
training's sizes and at sizes divisible by nothing (``VARIANTS``), their launches are recorded
instead of run (``captured``), and each is compiled exactly as Triton's JIT would
(``specialise``).  Must run with TRITON_INTERPRET unset or 0 (the interpreter replaces
``triton.jit``); tests/test_gpu_ready.py checks every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

# The input precisions a launcher can be asked for: (dtype, tf32).
PRECISIONS: Dict[str, Tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
# Largest shared memory one block may use (opt-in), in bytes: CUDA programming guide,
# "Technical Specifications per Compute Capability" (227 KB on 9.0, 163 KB on 8.0).
SHARED_LIMIT = {90: 232448, 80: 166912}
# The sizes a launch is made at.  Triton compiles one variant per pattern of integer arguments
# divisible by 16 (and pointers aligned to 16 B): "aligned" is training's (batch 256, D = 128,
# a bank of 65,536 rows: every size, stride and count a multiple of 16), "odd" none of them
# (batch 250, D = 100, 65,537 rows: e.g. ImageNet's 1,281,167-image bank).  Any other size
# compiles one of these two per argument; the two cover the extremes.
VARIANTS: Dict[str, Dict[str, int]] = {
    "aligned": {"B": 256, "D": 128, "N": 65536},
    "odd": {"B": 250, "D": 100, "N": 65537},
}


@dataclass(frozen=True)
class Launch:
    """One compiled variant: the kernel, its precision, the sizes it was launched at, and what
    Triton's JIT compiles for that launch (signature, constexprs, divisibility attributes and
    options), taken from a real call of the launcher (``captured``)."""

    name: str
    precision: str
    variant: str
    kernel: str  # "module:function" (picklable, for the compile pool)
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[tuple, object], ...]
    attrs: Tuple[Tuple[tuple, tuple], ...]
    options: Tuple[Tuple[str, object], ...]
    uses_dot: bool = True

    def fn(self):
        import importlib

        mod, name = self.kernel.split(":")
        return getattr(importlib.import_module(mod), name)

    @property
    def num_warps(self) -> int:
        return dict(self.options)["num_warps"]

    def key(self):
        """What makes two launches the same compiled kernel (and the row's identity)."""
        return (self.kernel, self.signature, self.constexprs, self.attrs, self.options)


@contextlib.contextmanager
def captured():
    """Record Triton kernel launches instead of running them: yields the list of
    ``(JITFunction, args, kwargs)`` the code inside makes.  Every tensor argument is zeroed (what
    a kernel would have written is read back as indices, minima, counts), so the launchers' own
    torch code runs on to the next launch: the values mean nothing, and a launch's
    specialisation depends on its sizes and addresses alone."""
    from triton.runtime.jit import JITFunction

    calls, run = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
        with torch.no_grad():
            for a in args:
                if isinstance(a, torch.Tensor):
                    a.zero_()

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = run


def specialise(fn, args, kwargs, arch: int = 90):
    """What Triton's JIT compiles for the launch ``fn[grid](*args, **kwargs)`` on sm_``arch``:
    (signature, constexprs, attrs, options), through the JIT's own binder and argument packing
    (so the divisibility specialisation is exactly a real launch's), without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, options)


def _row_name(fn, constexprs) -> str:
    c = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    names = [fn.arg_names[i] if isinstance(i, int) else i for i in c]
    named = dict(zip(names, c.values()))
    base = fn.__name__.lstrip("_")
    if base == "sc_bwd":
        return f"sc_bwd_{'f1' if named['ROWS'] else 'f2'}"
    if base == "hardest_kernel":
        return f"triplet_hardest_{'cosine' if named['COSINE'] else 'euclidean'}"
    if base == "bank_scan":
        return f"bank_scan_{'topk' if named['COLLECT'] else 'full'}"
    return base


def run_launchers(dtype: torch.dtype, tf32: bool, B: int, D: int, N: int, K: int = 4096) -> None:
    """Every fused loss forward and backward once, at these sizes (inside ``captured``)."""
    from fastssl.losses.bank_loss import BankLossSettings

    from . import bank_loss, sc_loss, triplet

    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_()

    sc_loss.sc_loss_fused(leaf(B, D), leaf(B, D), tf32).backward()
    for distance in ("euclidean", "cosine"):
        triplet.triplet_loss_fused(leaf(B, D), leaf(B, D), None, 0.5, distance, hardest=True, tf32=tf32).backward()
    bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(dtype)
    index, pos = torch.arange(B), torch.randint(0, N, (B, 5), generator=g)
    for background in (K, 0):
        f = leaf(B, D, dt=torch.float32)
        settings = BankLossSettings(temperature=0.1, background=background, hard_positives=2)
        l_ins, l_inv = bank_loss.bank_loss_fused(f, bank, index, pos, settings, tf32=tf32)
        (l_ins.mean() + l_inv.nan_to_num().mean()).backward()


def launches(variants=tuple(VARIANTS), arch: int = 90, precisions=tuple(PRECISIONS)) -> List[Launch]:
    """Every kernel variant the launchers of fastssl/kernels/ compile, per input precision and
    size pattern (``VARIANTS``), as a real launch specialises it (no interpreter workarounds:
    TRITON_INTERPRET must be unset); duplicates (e.g. the TF32 top-K gather, which has no
    product) are listed once."""
    out, seen = [], set()
    for variant in variants:
        for prec in precisions:
            dtype, tf32 = PRECISIONS[prec]
            with captured() as calls:
                run_launchers(dtype, tf32, **VARIANTS[variant])
            for fn, args, kwargs in calls:
                options, signature, constexprs, attrs = specialise(fn, args, kwargs, arch)
                launch = Launch(
                    name=_row_name(fn, constexprs),
                    precision=prec,
                    variant=variant,
                    kernel=f"{fn.fn.__module__}:{fn.__name__}",
                    signature=tuple(signature.items()),
                    constexprs=tuple(constexprs.items()),
                    attrs=tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()),
                    options=tuple((k, options.__dict__[k]) for k in ("num_warps", "num_stages", "num_ctas")),
                    uses_dot=fn.__name__ != "_bank_grad_topk",  # (a gather and a weighted sum)
                )
                if launch.key() not in seen:
                    seen.add(launch.key())
                    out.append(launch)
    return out


def variant_keys(dtype: torch.dtype, sizes: Dict[str, int], arch: int = 90) -> Dict[str, tuple]:
    """Kernel row name -> what its launch compiles (signature and divisibility attributes) when
    the launchers run at ``sizes`` (B, D, N, K)."""
    with captured() as calls:
        run_launchers(dtype, False, **sizes)
    out = {}
    for fn, args, kwargs in calls:
        _, signature, constexprs, attrs = specialise(fn, args, kwargs, arch)
        divisible = tuple(sorted(k for k, v in attrs.items() if v))  # (every argument has an entry; most empty)
        out[_row_name(fn, constexprs)] = (tuple(signature.items()), divisible)
    return out


def selfcheck_variants() -> List[Dict]:
    """Per training size pattern (``VARIANTS``, K = 4,096) and dtype: whether the one-time check
    (``selfcheck.check_sizes``) compiles each kernel's variant that training launches."""
    from .selfcheck import check_sizes

    rows = []
    for variant, sizes in VARIANTS.items():
        sizes = dict(sizes, K=4096)
        for dtype in (torch.float32, torch.bfloat16):
            train, check = variant_keys(dtype, sizes), variant_keys(dtype, check_sizes(**sizes))
            for name in sorted(train):
                rows.append(
                    {"kernel": name, "variant": variant, "dtype": str(dtype), "same": train[name] == check.get(name)}
                )
    return rows


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_row(launch: Launch, arch: int = 90) -> Dict:
    """Compile ``launch`` for sm_``arch``: its table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.fn()
    t0 = time.perf_counter()
    consts = {k: v for k, v in launch.constexprs}
    row = {
        "kernel": launch.name,
        "precision": launch.precision,
        "variant": launch.variant,
        "arch": f"sm_{arch}",
        "num_warps": launch.num_warps,
        "tiles": " ".join(f"{fn.arg_names[k[0]]}={v}" for k, v in consts.items() if fn.arg_names[k[0]].startswith("B")),
        "uses_dot": launch.uses_dot,
    }
    try:
        k = triton.compile(
            ASTSource(fn, dict(launch.signature), consts, {k: [list(a) for a in v] for k, v in launch.attrs}),
            target=GPUTarget("cuda", arch, 32),
            options=dict(launch.options),
        )
    except Exception as e:  # a configuration that does not compile is a row, not a crash
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    ptx = k.asm["ptx"]
    row["tensor_cores"] = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    row["shared"], row["shared_limit"] = int(k.metadata.shared), SHARED_LIMIT.get(arch)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    row["registers"], row["stack"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _row(args):
    return compile_row(*args)


def table(
    archs=(90,),
    workers: int = 2,
    progress: bool = False,
    jsonl: str | None = None,
    variants=tuple(VARIANTS),
    precisions=tuple(PRECISIONS),
) -> List[Dict]:
    """Every launch compiled for every arch in ``archs`` (``workers`` processes); ``jsonl``: append
    each row to this file as it is compiled (a run stopped half way keeps them)."""
    jobs = [(launch, arch) for arch in archs for launch in launches(variants, arch, precisions)]
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, row in enumerate(pool.map(_row, jobs), 1):
            rows.append(row)
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if progress:
                print(
                    f"[{i}/{len(jobs)}] {row['kernel']} {row['precision']} {row['variant']} {row['arch']}",
                    file=sys.stderr,
                )
    return rows


def problems(row: Dict) -> List[str]:
    """What would fail on the GPU: the row did not compile, needs more shared memory than the
    target gives a block (Triton's OutOfResources at launch), or (half and TF32 inputs of a
    kernel with products) misses the tensor cores."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared_limit"] is not None and row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B > {row['shared_limit']} B")
    if row["uses_dot"] and row["precision"] != "fp32" and row["tensor_cores"] == "none":
        out.append("no tensor-core instruction (mma/wgmma) in the PTX")
    return out


def spills(row: Dict) -> bool:
    """Whether the compiled kernel keeps registers on the stack (slower, not wrong)."""
    return bool(row.get("stack"))


def markdown(rows: List[Dict]) -> str:
    head = (
        "| kernel | precision | sizes | arch | warps | tiles | shared (B) | limit (B) | registers | stack (B) "
        "| tensor cores |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r['precision']} | {r['variant']} | {r['arch']} | {r['num_warps']} | "
                f"{r['tiles']} | error: {r['error']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['precision']} | {r['variant']} | {r['arch']} | {r['num_warps']} | {r['tiles']} | "
            f"{r['shared']} | {r['shared_limit']} | {r['registers']} | {r['stack']} | {r['tensor_cores']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.kernels.compiled", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (default: one line per row)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--jsonl", help="append each row to this JSON-lines file as it is compiled")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument(
        "--selfcheck", action="store_true", help="only say whether the one-time check compiles training's variants"
    )
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "fastssl.kernels.compiled: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr
        )
        return 2
    if a.selfcheck:
        rows = selfcheck_variants()
        print("\n".join(json.dumps(r) for r in rows))
        return 0 if all(r["same"] for r in rows) else 1
    rows = table(tuple(a.arch), a.workers, True, a.jsonl, tuple(a.variants), tuple(a.precisions))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows) if a.markdown else "\n".join(json.dumps(r) for r in rows))
    for r in rows:
        if spills(r):
            print(
                f"fastssl.kernels.compiled: note: {r['kernel']} {r['precision']} {r['variant']} {r['arch']} spills "
                f"({r['stack']} B stack frame)",
                file=sys.stderr,
            )
    bad = [(r, why) for r in rows for why in problems(r)]
    for r, why in bad:
        print(
            f"fastssl.kernels.compiled: {r['kernel']} {r['precision']} {r['variant']} {r['arch']}: {why}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
