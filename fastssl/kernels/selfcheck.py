"""A fused kernel's one-time check in this process, and the ``loss.impl`` choice built on it.

Before ``loss.impl=auto`` hands a run to a fused kernel, the kernel runs once against its eager
twin, values and gradients, on the device, in the dtype and with the TF32 choice the run will
use.  Only when that passes does the run use it; otherwise one line says why (the kernel did not
compile, ran out of resources, or disagreed) and the run continues on the eager twin.

What the check compiles is what training launches.  Triton compiles one variant of a kernel per
pattern of integer arguments divisible by 16 (sizes and strides; the kernels do not specialise
on their column split), so the check's sizes keep the run's sizes modulo 16 (``check_sizes``:
at least 128 rows, so that the launchers split the columns over programs as they do for a
training batch); ``tests/test_gpu_ready.py`` compares the two launches' specialisations.  The agreement asked is relative to the size of each tensor
(values and each gradient on its own, no floor at 1: a fused backward that returns half the
gradient fails however small the gradients are).

``FASTSSL_FAULT_KERNEL=<name>|all`` makes the check fail (fault injection: tests and ``python -m
fastssl.doctor``).  ``auto`` considers the fused kernels on CUDA tensors; on CPU tensors under the
Triton interpreter only when ``FASTSSL_AUTO_INTERPRETED=1`` (so the whole path can be exercised
without a GPU; the interpreter is slow).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch

from .runtime import interpreted

KERNELS = ("sc_loss", "triplet", "bank_loss")
# Agreement asked of the check: max |fused - eager| / max |eager|, per tensor, by input precision.
# bf16/fp16 backward products round the softmax weights to the input dtype on the tensor cores
# (~4e-3 each); TF32 rounds the inputs to 10 mantissa bits, which 1 / temperature magnifies.
TOL = {"fp32": 1e-4, "tf32": 3e-2, "bf16": 2e-2, "fp16": 2e-2}
_RESULTS: Dict[tuple, Tuple[bool, str]] = {}
_SAID: set = set()


def precision(dtype: torch.dtype, tf32: bool = False) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_sizes(B: int = 256, D: int = 128, N: int = 65536, K: int = 4096) -> Dict[str, int]:
    """The check's sizes for a run launching at (B, D, N, K): each with the same remainder modulo
    16 (so Triton compiles the same variant), B at least 128 (the launchers then split the
    columns over several programs, as for a training batch), small enough to be quick."""
    return {
        "B": 128 + B % 16,
        "D": 64 + D % 16,
        "N": 1024 + N % 16,
        "K": 0 if K <= 0 else 64 + K % 16,
    }


def _cases(name: str, sizes: Dict[str, int], tf32: bool) -> Callable:
    """``run(impl, device, dtype) -> list of tensors`` (values, then gradients) for ``name``."""
    g = torch.Generator().manual_seed(0)
    B, D, N, K = (sizes[k] for k in "BDNK")

    def leaf(*shape, device, dtype, unit=False):
        x = torch.randn(*shape, generator=g)
        x = torch.nn.functional.normalize(x, dim=1) if unit else x
        return x.to(device, dtype).requires_grad_()

    fused_kw = {"tf32": True} if tf32 else {}
    if name == "sc_loss":
        from fastssl.losses.sc_loss import sc_loss_eager

        from .sc_loss import sc_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            f1, f2 = leaf(B, D, device=device, dtype=dtype), leaf(B, D, device=device, dtype=dtype)
            loss = sc_loss_fused(f1, f2, **fused_kw) if impl == "fused" else sc_loss_eager(f1, f2)
            return [loss, *torch.autograd.grad(loss, (f1, f2))]
    elif name == "triplet":
        from fastssl.losses.triplet import triplet_loss_eager

        from .triplet import triplet_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            a, p, n = (leaf(B, D, device=device, dtype=dtype) for _ in range(3))
            kw = dict(margin=0.5, hardest=True)
            loss = (
                triplet_loss_fused(a, p, n, **kw, **fused_kw) if impl == "fused" else triplet_loss_eager(a, p, n, **kw)
            )
            return [loss, *torch.autograd.grad(loss, (a, p, n))]
    elif name == "bank_loss":
        from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager

        from .bank_loss import bank_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            f = leaf(B, D, device=device, dtype=torch.float32, unit=True)
            bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype)
            index = torch.arange(B, device=device)
            pos = torch.randint(0, N, (B, 5), generator=g).to(device)
            out = []
            for background in sorted({K, 0}, reverse=True):  # the run's top-K background, and the whole bank
                args = (f, bank, index, pos, BankLossSettings(temperature=0.1, background=background, hard_positives=2))
                l_ins, l_inv = bank_loss_fused(*args, **fused_kw) if impl == "fused" else bank_loss_eager(*args)
                total = l_ins.mean() + l_inv.mean()
                out += [total, torch.autograd.grad(total, f)[0]]
            return out
    else:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    return run


def _compare(name: str, device: torch.device, dtype: torch.dtype, tf32: bool, sizes: Dict[str, int]):
    run = _cases(name, sizes, tf32)
    fused, eager = run("fused", device, dtype), run("eager", device, dtype)
    tol = TOL[precision(dtype, tf32)]
    shape = " x ".join(str(sizes[k]) for k in "BD")
    for i, (a, b) in enumerate(zip(fused, eager)):
        a, b = a.detach().float(), b.detach().float()
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
        if not err <= tol:  # (also catches NaN)
            what = "value" if b.dim() == 0 else "gradient"
            return (
                False,
                f"{what} differs from the eager twin by {err:.2e} of its size (> {tol:.0e}) on a {shape} check",
            )
    return True, "matches the eager twin"


def check(
    name: str, device, dtype: torch.dtype = torch.float32, tf32: bool = False, sizes: Optional[Dict[str, int]] = None
) -> Tuple[bool, str]:
    """Whether the fused ``name`` kernel runs on ``device`` with ``dtype`` inputs (``tf32``: fp32
    on the TF32 tensor cores) and matches its eager twin (values and gradients) at ``sizes``
    (``check_sizes`` of the run's); ``(ok, why)``, computed once per process and variant."""
    device = torch.device(device)
    sizes = sizes or check_sizes()
    key = (name, str(device), dtype, bool(tf32), tuple(sorted(sizes.items())))
    if key not in _RESULTS:
        fault = os.environ.get("FASTSSL_FAULT_KERNEL", "")
        if fault in (name, "all"):
            _RESULTS[key] = (False, "fault injected (FASTSSL_FAULT_KERNEL)")
        elif device.type != "cuda" and not interpreted():
            _RESULTS[key] = (False, "no CUDA device (and TRITON_INTERPRET is not 1)")
        else:
            try:
                _RESULTS[key] = _compare(name, device, dtype, tf32, sizes)
            except Exception as e:  # a compile error, OutOfResources, a driver error: all mean "use eager"
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _RESULTS[key] = (False, f"{type(e).__name__}: {first}"[:300])
    return _RESULTS[key]


def _auto_candidate(t: torch.Tensor) -> bool:
    return t.is_cuda or (interpreted() and os.environ.get("FASTSSL_AUTO_INTERPRETED") == "1")


def resolve(impl: str, name: str, t: torch.Tensor, tf32: bool = False, **sizes: int) -> str:
    """``loss.impl`` for kernel ``name`` on tensors like ``t`` (``tf32``: ``loss.tf32``; ``sizes``:
    the launch's B, D and, for the bank, N and K): ``eager`` and ``fused`` as asked; ``auto`` =
    fused where it can run and passed its check, else eager, said once per process."""
    if impl != "auto":
        return impl
    if not _auto_candidate(t):
        return "eager"
    ok, why = check(name, t.device, t.dtype, tf32, check_sizes(**sizes))
    if ok:
        return "fused"
    if name not in _SAID:
        _SAID.add(name)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            print(
                f"fastssl: loss: the fused {name} kernel is not used ({why}); training on its eager twin "
                f"(set loss.impl=eager to skip the check)",
                file=sys.stderr,
                flush=True,
            )
    return "eager"
