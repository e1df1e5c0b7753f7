"""A probe of dot_tile at a block whose first row sits past 2^31 elements (run in its own process:
a wrapped 32-bit offset reads outside the tensor)."""

import sys

import torch
import triton
import triton.language as tl

from fastssl.kernels._common import dot_tile


@triton.jit
def _probe(
    a_ptr, b_ptr, out_ptr, c0, NB, D, stride_a, stride_b, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr
):
    acc = dot_tile(a_ptr, b_ptr, 0, c0, BM, NB, D, stride_a, stride_b, BM, BN, BLOCK_D, "ieee", False)
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    tl.store(out_ptr + r[:, None] * BN + c[None, :], acc)


D, BM, BN = 16, 16, 16
c0 = 2**31 // D + 3  # the block's first row starts past element 2^31
b = torch.empty(c0 + BN, D)  # ~8.6 GB of address space; only the touched pages become memory
g = torch.Generator().manual_seed(0)
b[c0:] = torch.randn(BN, D, generator=g)
a = torch.randn(BM, D, generator=g)
out = torch.empty(BM, BN)
_probe[(1,)](a, b, out, c0, c0 + BN, D, a.stride(0), b.stride(0), BM=BM, BN=BN, BLOCK_D=16)
ok = torch.allclose(out, a @ b[c0:].t(), atol=1e-5)
print("ok" if ok else "wrong values")
sys.exit(0 if ok else 1)
