"""A fused kernel's one-time check in this process, and the ``loss.impl`` choice built on it.

Before ``loss.impl=auto`` hands a run to a fused kernel, the kernel runs once on a small input
with odd sizes against its eager twin, values and gradients, on the device and in the dtype the
run will use.  Only when that passes does the run use it; otherwise one line says why (the
kernel did not compile, ran out of resources, or disagreed) and the run continues on the eager
twin.  ``FASTSSL_FAULT_KERNEL=<name>|all`` makes the check fail (fault injection: tests and
``python -m fastssl.doctor``).  ``auto`` considers the fused kernels on CUDA tensors; on CPU
tensors under the Triton interpreter only when ``FASTSSL_AUTO_INTERPRETED=1`` (so the whole
path can be exercised without a GPU; the interpreter is slow).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Tuple

import torch

from ._common import interpreted

KERNELS = ("sc_loss", "triplet", "bank_loss")
# Agreement asked of the check (relative, on values and gradients), by input dtype.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
_RESULTS: Dict[tuple, Tuple[bool, str]] = {}
_SAID: set = set()


def _cases(name: str) -> Callable:
    """``run(impl, device, dtype) -> list of tensors`` (values, then gradients) for ``name``."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, device, dtype, unit=False):
        x = torch.randn(*shape, generator=g)
        x = torch.nn.functional.normalize(x, dim=1) if unit else x
        return x.to(device, dtype).requires_grad_()

    if name == "sc_loss":
        from .sc_loss import sc_loss_eager, sc_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            f1, f2 = leaf(37, 70, device=device, dtype=dtype), leaf(37, 70, device=device, dtype=dtype)
            loss = (sc_loss_fused if impl == "fused" else sc_loss_eager)(f1, f2)
            return [loss, *torch.autograd.grad(loss, (f1, f2))]
    elif name == "triplet":
        from .triplet import triplet_loss_eager, triplet_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            a, p, n = (leaf(37, 70, device=device, dtype=dtype) for _ in range(3))
            loss = (triplet_loss_fused if impl == "fused" else triplet_loss_eager)(a, p, n, margin=0.5, hardest=True)
            return [loss, *torch.autograd.grad(loss, (a, p, n))]
    elif name == "bank_loss":
        from .bank_loss import bank_loss_eager, bank_loss_fused

        def run(impl, device, dtype):
            g.manual_seed(0)
            f = leaf(21, 70, device=device, dtype=torch.float32, unit=True)
            bank = torch.nn.functional.normalize(torch.randn(301, 70, generator=g), dim=1).to(device, dtype)
            index = torch.arange(21, device=device)
            pos = torch.randint(0, 301, (21, 5), generator=g).to(device)
            fn = bank_loss_fused if impl == "fused" else bank_loss_eager
            out = []
            for background in (16, 0):  # top-K background and the whole bank
                l_ins, l_inv = fn(f, bank, index, pos, 0.1, background, 2)
                total = l_ins.mean() + l_inv.mean()
                out += [total, torch.autograd.grad(total, f)[0]]
            return out
    else:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    return run


def _compare(name: str, device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    run = _cases(name)
    fused, eager = run("fused", device, dtype), run("eager", device, dtype)
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(fused, eager)):
        a, b = a.detach().float(), b.detach().float()
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        if not err <= tol:  # (also catches NaN)
            what = "value" if i == 0 or b.dim() == 0 else "gradient"
            return False, f"{what} differs from the eager twin by {err:.2e} (> {tol:.0e}) on a 37 x 70 check"
    return True, "matches the eager twin"


def check(name: str, device, dtype: torch.dtype = torch.float32) -> Tuple[bool, str]:
    """Whether the fused ``name`` kernel runs on ``device`` with ``dtype`` inputs and matches its
    eager twin (values and gradients); ``(ok, why)``, computed once per process."""
    device = torch.device(device)
    key = (name, str(device), dtype)
    if key not in _RESULTS:
        fault = os.environ.get("FASTSSL_FAULT_KERNEL", "")
        if fault in (name, "all"):
            _RESULTS[key] = (False, "fault injected (FASTSSL_FAULT_KERNEL)")
        elif device.type != "cuda" and not interpreted():
            _RESULTS[key] = (False, "no CUDA device (and TRITON_INTERPRET is not 1)")
        else:
            try:
                _RESULTS[key] = _compare(name, device, dtype)
            except Exception as e:  # a compile error, OutOfResources, a driver error: all mean "use eager"
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _RESULTS[key] = (False, f"{type(e).__name__}: {first}"[:300])
    return _RESULTS[key]


def _auto_candidate(t: torch.Tensor) -> bool:
    return t.is_cuda or (interpreted() and os.environ.get("FASTSSL_AUTO_INTERPRETED") == "1")


def resolve(impl: str, name: str, t: torch.Tensor) -> str:
    """``loss.impl`` for kernel ``name`` on tensors like ``t``: ``eager`` and ``fused`` as asked;
    ``auto`` = fused where it can run and passed its check, else eager, said once per process."""
    if impl != "auto":
        return impl
    if not _auto_candidate(t):
        return "eager"
    ok, why = check(name, t.device, t.dtype)
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
