"""Helpers shared by the kernel files."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t``: on CUDA, or anywhere under the interpreter."""
    return t.is_cuda or interpreted()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ('ieee'); half inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def upcast(dtype: torch.dtype) -> bool:
    """Upcast bf16 tiles before ``tl.dot`` under the interpreter, whose bf16 dot is wrong
    (numpy has no bf16); on the GPU bf16 tiles go to the tensor cores as they are."""
    return interpreted() and dtype == torch.bfloat16


@triton.jit
def dot_tile(a_ptr, b_ptr, rows, cols, NA, NB, D, stride_a, stride_b,
             BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(BM, BN) fp32 inner products a[rows] . b[cols] over D in BLOCK_D chunks (masked edges)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs = k + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs[None, :], mask=(rows[:, None] < NA) & (offs[None, :] < D), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + offs[None, :], mask=(cols[:, None] < NB) & (offs[None, :] < D), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; the GPU's is native
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc
