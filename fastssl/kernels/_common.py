"""Helpers shared by the kernel files: the dtype policy, and the tile loop every pairwise kernel
uses (where the kernels can run: ``runtime``, which imports no Triton).

Dtype policy (the same for every kernel, and for its eager twin in fastssl/losses/):

* The inputs' dtype decides the products.  bf16/fp16 tiles go to the tensor cores as they are
  (``mma``/``wgmma``; a product of two bf16 numbers is exact in fp32); fp32 tiles use exact
  fp32 FMA (``ieee``), or TF32 tensor cores when the caller asks for it (``loss.tf32``).
* Every sum is accumulated in fp32, and every output is fp32.
* The eager twins compute the same maths: inputs upcast to fp32, products and sums in fp32,
  with autocast switched off (``fastssl.losses.precision.no_autocast``), so that a twin under
  ``torch.autocast`` is still the reference and not a bf16 matmul.  Methods hand both the same
  tensors: ``fastssl.losses.precision.loss_input`` casts features to the autocast dtype when
  autocast is on (bf16 on GPUs by default), so the fused kernel uses the tensor cores and the
  twin sees the same numbers.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .runtime import interpreted


def dot_precision(dtype: torch.dtype, tf32: bool = False) -> str:
    """``tl.dot``'s input precision: fp32 inputs use exact fp32 products ('ieee') unless TF32 is
    asked for; half inputs use the tensor cores whatever this says."""
    return "tf32" if tf32 or dtype != torch.float32 else "ieee"


def half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def launch_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def upcast(dtype: torch.dtype, interp: bool | None = None) -> bool:
    """Upcast bf16 tiles before ``tl.dot`` under the interpreter (``interp``; default: as this
    process runs), whose bf16 dot is wrong (numpy has no bf16); on the GPU bf16 tiles go to the
    tensor cores as they are."""
    return (interpreted() if interp is None else interp) and dtype == torch.bfloat16


def grid_split(blocks: int, target: int, most: int) -> int:
    """How many programs share one output block's reduction so that about ``target`` programs
    run (enough to fill the GPU's SMs when the batch is small); at most ``most``."""
    return max(1, min(most, -(-target // max(1, blocks))))


# Programs a launch aims for: two per SM of the largest current GPUs (132 on an H100/H200).
TARGET_PROGRAMS = 264


@triton.jit
def dot_tile(
    a_ptr,
    b_ptr,
    r0,
    c0,
    NA,
    NB,
    D,
    stride_a,
    stride_b,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BM, BN) fp32 inner products a[r0 : r0 + BM] . b[c0 : c0 + BN] over D in BLOCK_D chunks
    (masked edges).  The blocks' first rows are reached by a 64-bit scalar offset (N x D may
    exceed 2^31: a 1.28M-entry bank at D = 2,048); offsets inside a block stay 32-bit, which
    keeps the pointer tiles small (64-bit pointer tiles cost registers)."""
    ra = tl.arange(0, BM)
    rb = tl.arange(0, BN)
    a_blk = a_ptr + tl.cast(r0, tl.int64) * stride_a
    b_blk = b_ptr + tl.cast(c0, tl.int64) * stride_b
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs = k + tl.arange(0, BLOCK_D)
        a = tl.load(
            a_blk + ra[:, None] * stride_a + offs[None, :],
            mask=(r0 + ra[:, None] < NA) & (offs[None, :] < D),
            other=0.0,
        )
        b = tl.load(
            b_blk + rb[:, None] * stride_b + offs[None, :],
            mask=(c0 + rb[:, None] < NB) & (offs[None, :] < D),
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 dot is wrong; the GPU's is native
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc
