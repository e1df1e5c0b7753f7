"""Every fused-kernel configuration the launchers can use, compiled for a GPU target without a
GPU: shared memory against the target's per-block limit, registers and stack (spills), and
whether the PTX uses the tensor cores.

    python -m fastssl.kernels.compiled [--arch 90 80] [--markdown] [--json PATH]

Triton compiles for ``GPUTarget("cuda", arch, 32)`` with its bundled ptxas; the bundled
``cuobjdump -res-usage`` reads the registers and the stack frame (a frame above zero means
spilled registers) off the cubin.  Each kernel file's ``configs(dtype, tf32)`` is the one place
the launchers read their tiles from, and it gives one configuration per input precision for
any batch, bank and feature size (D is tiled), so the table below covers every launch the code
can make.  Must run with TRITON_INTERPRET unset or 0 (the interpreter replaces ``triton.jit``);
``launches()`` and ``compile_row()`` are what tests/test_compiled.py checks.
"""

from __future__ import annotations

import argparse
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
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_FLOATS = {"inv_tau"}  # the kernels' fp32 scalar arguments (the other scalars are int32)


@dataclass(frozen=True)
class Launch:
    """One kernel configuration: the kernel, its pointer types and constexprs."""

    name: str
    precision: str
    kernel: str  # "module:function" (picklable, for the compile pool)
    pointers: Tuple[Tuple[str, str], ...]  # non-fp32 pointer arguments
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    uses_dot: bool = True

    def fn(self):
        import importlib

        mod, name = self.kernel.split(":")
        return getattr(importlib.import_module(mod), name)


def _launch(name, precision, kernel, pointers, cfg, uses_dot=True) -> Launch:
    cfg = dict(cfg)
    warps = cfg.pop("num_warps")
    return Launch(name, precision, kernel, tuple(sorted(pointers.items())), tuple(sorted(cfg.items())), warps, uses_dot)


def launches() -> List[Launch]:
    """Every configuration the launchers of fastssl/kernels/ can launch, one per kernel variant and
    input precision (as compiled for a GPU: no interpreter workarounds)."""
    from . import bank_loss, sc_loss, triplet

    out = []
    for prec, (dtype, tf32) in PRECISIONS.items():
        p = _PTR[dtype]
        sc = sc_loss.configs(dtype, tf32, interp=False)
        out.append(_launch("sc_fwd", prec, "fastssl.kernels.sc_loss:_sc_fwd", {"a_ptr": p, "b_ptr": p}, sc["fwd"]))
        for rows, which in ((True, "f1"), (False, "f2")):
            out.append(
                _launch(
                    f"sc_bwd_{which}",
                    prec,
                    "fastssl.kernels.sc_loss:_sc_bwd",
                    {"x_ptr": p, "y_ptr": p},
                    dict(sc["bwd"], ROWS=rows),
                )
            )
        tr = triplet.configs(dtype, tf32, interp=False)["hardest"]
        for cosine in (False, True):
            out.append(
                _launch(
                    f"triplet_hardest_{'cosine' if cosine else 'euclidean'}",
                    prec,
                    "fastssl.kernels.triplet:_hardest_kernel",
                    {"a_ptr": p, "c_ptr": p, "out_i_ptr": "*i32"},
                    dict(tr, COSINE=cosine),
                )
            )
        bk = bank_loss.configs(dtype, tf32, interp=False)
        out.append(
            _launch(
                "bank_scan_topk",
                prec,
                "fastssl.kernels.bank_loss:_bank_scan",
                {"f_ptr": p, "bank_ptr": p, "cnt_ptr": "*i32", "cidx_ptr": "*i32"},
                dict(bk["scan"], COLLECT=True),
            )
        )
        out.append(
            _launch(
                "bank_scan_full",
                prec,
                "fastssl.kernels.bank_loss:_bank_scan",
                {"f_ptr": p, "bank_ptr": p},
                dict(bk["scan"], COLLECT=False),
            )
        )
        out.append(
            _launch(
                "bank_grad_full",
                prec,
                "fastssl.kernels.bank_loss:_bank_grad_full",
                {"f_ptr": p, "bank_ptr": p},
                bk["grad_full"],
            )
        )
        if not tf32:  # a gather and a weighted sum: no product to put on the tensor cores
            out.append(
                _launch(
                    "bank_grad_topk",
                    prec,
                    "fastssl.kernels.bank_loss:_bank_grad_topk",
                    {"bank_ptr": p, "idx_ptr": "*i64"},
                    bk["grad_topk"],
                    uses_dot=False,
                )
            )
    return out


def signature(fn, launch: Launch) -> Dict[str, str]:
    """Triton's signature of ``fn`` for ``launch``: constexprs, pointer types (fp32 unless
    named), fp32 scalars by name, int32 for the other scalars."""
    ptrs, consts = dict(launch.pointers), dict(launch.constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    return sig


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
    row = {
        "kernel": launch.name,
        "precision": launch.precision,
        "arch": f"sm_{arch}",
        "num_warps": launch.num_warps,
        "tiles": " ".join(f"{k}={v}" for k, v in launch.constexprs if k.startswith("B")),
        "uses_dot": launch.uses_dot,
    }
    try:
        k = triton.compile(
            ASTSource(fn, signature(fn, launch), constexprs=dict(launch.constexprs)),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": launch.num_warps},
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


def table(archs=(90,), workers: int = 2, progress: bool = False) -> List[Dict]:
    """Every launch compiled for every arch in ``archs`` (``workers`` processes)."""
    jobs = [(launch, arch) for arch in archs for launch in launches()]
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, row in enumerate(pool.map(_row, jobs), 1):
            rows.append(row)
            if progress:
                print(f"[{i}/{len(jobs)}] {row['kernel']} {row['precision']} {row['arch']}", file=sys.stderr)
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
        "| kernel | precision | arch | warps | tiles | shared (B) | limit (B) | registers | stack (B) | tensor cores |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r['precision']} | {r['arch']} | {r['num_warps']} | {r['tiles']} | "
                f"error: {r['error']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['precision']} | {r['arch']} | {r['num_warps']} | {r['tiles']} | "
            f"{r['shared']} | {r['shared_limit']} | {r['registers']} | {r['stack']} | {r['tensor_cores']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.kernels.compiled", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (default: one line per row)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "fastssl.kernels.compiled: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr
        )
        return 2
    rows = table(tuple(a.arch), a.workers, progress=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows) if a.markdown else "\n".join(json.dumps(r) for r in rows))
    for r in rows:
        if spills(r):
            print(
                f"fastssl.kernels.compiled: note: {r['kernel']} {r['precision']} {r['arch']} spills "
                f"({r['stack']} B stack frame)",
                file=sys.stderr,
            )
    bad = [(r, why) for r in rows for why in problems(r)]
    for r, why in bad:
        print(f"fastssl.kernels.compiled: {r['kernel']} {r['precision']} {r['arch']}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
