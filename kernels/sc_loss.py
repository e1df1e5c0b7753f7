"""Spatial Contrasting loss, fused: Euclidean distances + row softmax cross-entropy without
ever writing the B x B matrix to global memory.

    L = 1/B * sum_i [ logsumexp_j(-d_ij) + d_ii ],   d_ij = ||f1_i - f2_j||

Forward: one program per block of rows streams over blocks of f2, computes the distance tile
on chip (|a|^2 + |b|^2 - 2 a.b with ``tl.dot``) and keeps an online log-sum-exp per row.  The
positives d_ii are computed exactly from the differences (the expansion loses ~1e-3 to
cancellation near zero, which is where positives are) and substituted on the diagonal.
Backward, with G = (softmax - I) / B and W = G / d (zero where d = 0):

    dL/df1_i = -( rowsum(W)_i f1_i - (W f2)_i ),   dL/df2_j = -( colsum(W)_j f2_j - (W^T f1)_j )

two kernels (row blocks for f1, column blocks for f2) recompute the distance tiles instead of
storing them.  Memory: O(B * D) besides the inputs.  ``sc_loss_eager`` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import dot_precision, dot_tile, launch_device, upcast


def sc_loss_eager(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The reference: exact pairwise distances, then cross-entropy over negative distances."""
    logits = -torch.cdist(f1.float(), f2.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return F.cross_entropy(logits, torch.arange(f1.shape[0], device=f1.device))


@triton.jit
def _dist_tile(a_ptr, b_ptr, rows, cols, B, D, stride_a, stride_b, a_sq, b_sq, dpos,
               BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """(BM, BN) Euclidean distances of a-rows x b-rows, exact positives on the diagonal."""
    acc = dot_tile(a_ptr, b_ptr, rows, cols, B, B, D, stride_a, stride_b, BM, BN, BLOCK_D, PREC, UPCAST)
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * acc
    d = tl.sqrt(tl.maximum(d2, 0.0))
    return tl.where(rows[:, None] == cols[None, :], dpos[:, None], d)


@triton.jit
def _sc_fwd(a_ptr, b_ptr, a_sq_ptr, b_sq_ptr, dpos_ptr, lse_ptr, B, D, stride_a, stride_b,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    a_sq = tl.load(a_sq_ptr + rows, mask=rmask, other=0.0)
    dpos = tl.load(dpos_ptr + rows, mask=rmask, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        b_sq = tl.load(b_sq_ptr + cols, mask=cols < B, other=0.0)
        logits = -_dist_tile(a_ptr, b_ptr, rows, cols, B, D, stride_a, stride_b, a_sq, b_sq, dpos,
                             BLOCK_M, BLOCK_N, BLOCK_D, PREC, UPCAST)
        logits = tl.where(cols[None, :] < B, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rmask)


@triton.jit
def _sc_bwd(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, dpos_ptr, lse_ptr, grad_ptr, scale, B, D,
            stride_x, stride_y, stride_g,
            ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Gradient for the rows of x (= f1 when ROWS, else f2) against all rows of y.

    ROWS: x = f1, the tile is d(f1_i, f2_j) with i in this block, softmax over j (lse of i).
    else: x = f2, the tile is d(f1_i, f2_j) with j in this block, lse of each i in the stream.
    """
    xi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    xmask = xi < B
    x_sq = tl.load(x_sq_ptr + xi, mask=xmask, other=0.0)
    dpos_x = tl.load(dpos_ptr + xi, mask=xmask, other=0.0)
    if ROWS:
        lse_x = tl.load(lse_ptr + xi, mask=xmask, other=0.0)
    dd = tl.arange(0, BLOCK_D)
    wsum = tl.zeros((BLOCK_M,), tl.float32)
    wy = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, B, BLOCK_N):
        yj = n0 + tl.arange(0, BLOCK_N)
        ymask = yj < B
        y_sq = tl.load(y_sq_ptr + yj, mask=ymask, other=0.0)
        # distances d(x_i, y_j); the exact diagonal is the same vector either way round
        d = _dist_tile(x_ptr, y_ptr, xi, yj, B, D, stride_x, stride_y, x_sq, y_sq, dpos_x,
                       BLOCK_M, BLOCK_N, BLOCK_D, PREC, UPCAST)
        if ROWS:
            p = tl.exp(-d - lse_x[:, None])
        else:
            lse_y = tl.load(lse_ptr + yj, mask=ymask, other=0.0)
            p = tl.exp(-d - lse_y[None, :])
        g = (p - tl.where(xi[:, None] == yj[None, :], 1.0, 0.0)) * scale
        w = tl.where((d > 0.0) & xmask[:, None] & ymask[None, :], g / tl.where(d > 0.0, d, 1.0), 0.0)
        wsum += tl.sum(w, 1)
        y = tl.load(y_ptr + yj[:, None] * stride_y + dd[None, :], mask=ymask[:, None] & (dd[None, :] < D), other=0.0)
        wy += tl.dot(w, y.to(tl.float32), input_precision="ieee")
    x = tl.load(x_ptr + xi[:, None] * stride_x + dd[None, :], mask=xmask[:, None] & (dd[None, :] < D), other=0.0)
    grad = -(wsum[:, None] * x.to(tl.float32) - wy)
    tl.store(grad_ptr + xi[:, None] * stride_g + dd[None, :], grad, mask=xmask[:, None] & (dd[None, :] < D))


def _blocks(B: int, D: int):
    bd = max(16, triton.next_power_of_2(D))
    bm = 32 if bd <= 256 else 16
    return bm, 32, bd


class SCLossFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1, f2):
        if f1.shape != f2.shape or f1.ndim != 2:
            raise ValueError(f"sc_loss: f1 and f2 must both be (B, D), got {tuple(f1.shape)} and {tuple(f2.shape)}")
        f1, f2 = f1.contiguous(), f2.contiguous()
        B, D = f1.shape
        a_sq = f1.float().pow(2).sum(1)
        b_sq = f2.float().pow(2).sum(1)
        dpos = (f1.float() - f2.float()).norm(dim=1)  # exact positives, O(B * D)
        lse = torch.empty(B, device=f1.device, dtype=torch.float32)
        bm, bn, bd = _blocks(B, D)
        prec = dot_precision(f1.dtype)
        with launch_device(f1):
            _sc_fwd[(triton.cdiv(B, bm),)](f1, f2, a_sq, b_sq, dpos, lse, B, D, f1.stride(0), f2.stride(0),
                                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=min(bd, 64), PREC=prec,
                                           UPCAST=upcast(f1.dtype))
        ctx.save_for_backward(f1, f2, a_sq, b_sq, dpos, lse)
        return (lse + dpos).mean()

    @staticmethod
    def backward(ctx, gout):
        f1, f2, a_sq, b_sq, dpos, lse = ctx.saved_tensors
        B, D = f1.shape
        bm, bn, bd = _blocks(B, D)
        prec = dot_precision(f1.dtype)
        g1 = torch.empty(B, D, device=f1.device, dtype=torch.float32)
        g2 = torch.empty_like(g1)
        scale = 1.0 / B
        grid = (triton.cdiv(B, bm),)
        with launch_device(f1):
            _sc_bwd[grid](f1, f2, a_sq, b_sq, dpos, lse, g1, scale, B, D, f1.stride(0), f2.stride(0), g1.stride(0),
                          ROWS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, UPCAST=upcast(f1.dtype))
            _sc_bwd[grid](f2, f1, b_sq, a_sq, dpos, lse, g2, scale, B, D, f2.stride(0), f1.stride(0), g2.stride(0),
                          ROWS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, UPCAST=upcast(f1.dtype))
        return (g1 * gout).to(f1.dtype), (g2 * gout).to(f2.dtype)


def sc_loss_fused(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Same signature and value as ``sc_loss_eager``; fp32/bf16/fp16 inputs, fp32 accumulation."""
    return SCLossFused.apply(f1, f2)
