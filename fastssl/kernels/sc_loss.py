"""Spatial Contrasting loss, fused: Euclidean distances + row softmax cross-entropy without
ever writing the B x B matrix to global memory.

    L = 1/B * sum_i [ logsumexp_j(-d_ij) + d_ii ],   d_ij = ||f1_i - f2_j||

Forward: each program takes a block of rows and every SPLIT-th block of f2 (a second grid
axis, so that a batch of 256 still fills a GPU's SMs), computes the distance tile
on chip (|a|^2 + |b|^2 - 2 a.b with ``tl.dot``) and keeps an online log-sum-exp per row.  The
positives d_ii are computed exactly from the differences (the expansion loses ~1e-3 to
cancellation near zero, which is where positives are) and substituted on the diagonal.
Backward, with G = (softmax - I) / B and W = G / d (zero where d = 0):

    dL/df1_i = -( rowsum(W)_i f1_i - (W f2)_i ),   dL/df2_j = -( colsum(W)_j f2_j - (W^T f1)_j )

two kernels (row blocks for f1, column blocks for f2) recompute the distance tiles instead of
storing them; the output dimensions are tiled along a third grid axis (any D fits in shared
memory) and the column blocks split as in the forward; the partial sums are added on the
host.  Memory: O(SPLIT * B * D) besides the inputs.  ``sc_loss_eager`` (fastssl/losses/sc_loss.py)
is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastssl.losses.precision import no_autocast

from ._common import TARGET_PROGRAMS, dot_precision, dot_tile, grid_split, half, launch_device, upcast


@triton.jit
def _dist_tile(
    a_ptr,
    b_ptr,
    r0,
    c0,
    B,
    D,
    stride_a,
    stride_b,
    a_sq,
    b_sq,
    dpos,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BM, BN) Euclidean distances of a-rows r0.. x b-rows c0.., exact positives on the diagonal."""
    acc = dot_tile(a_ptr, b_ptr, r0, c0, B, B, D, stride_a, stride_b, BM, BN, BLOCK_D, PREC, UPCAST)
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * acc
    d = tl.sqrt(tl.maximum(d2, 0.0))
    return tl.where(rows[:, None] == cols[None, :], dpos[:, None], d)


@triton.jit(do_not_specialize=["SPLIT"])  # (SPLIT: a count, not a size; one variant for any)
def _sc_fwd(
    a_ptr,
    b_ptr,
    a_sq_ptr,
    b_sq_ptr,
    dpos_ptr,
    pm_ptr,
    ps_ptr,
    B,
    D,
    stride_a,
    stride_b,
    SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rows of block program_id(0) against every SPLIT-th column block from program_id(1):
    the partial (max, sum exp) of the row's logits, combined on the host."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    a_sq = tl.load(a_sq_ptr + rows, mask=rmask, other=0.0)
    dpos = tl.load(dpos_ptr + rows, mask=rmask, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, B, SPLIT * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        b_sq = tl.load(b_sq_ptr + cols, mask=cols < B, other=0.0)
        logits = -_dist_tile(
            a_ptr,
            b_ptr,
            tl.program_id(0) * BLOCK_M,
            n0,
            B,
            D,
            stride_a,
            stride_b,
            a_sq,
            b_sq,
            dpos,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            PREC,
            UPCAST,
        )
        logits = tl.where(cols[None, :] < B, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
    at = tl.program_id(1) * B + rows
    tl.store(pm_ptr + at, m, mask=rmask)
    tl.store(ps_ptr + at, s, mask=rmask)


@triton.jit(do_not_specialize=["SPLIT"])  # (SPLIT: a count, not a size; one variant for any)
def _sc_bwd(
    x_ptr,
    y_ptr,
    x_sq_ptr,
    y_sq_ptr,
    dpos_ptr,
    lse_ptr,
    part_ptr,
    B,
    D,
    stride_x,
    stride_y,
    SPLIT,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HALF_DOT: tl.constexpr,
):
    """B x gradient for the rows of x (= f1 when ROWS, else f2) against every SPLIT-th column
    block of y from program_id(1), output dimensions [program_id(2) * BLOCK_DO, + BLOCK_DO);
    the distances always use all D (in BLOCK_D chunks).  Partial sums, added on the host.

    ROWS: x = f1, the tile is d(f1_i, f2_j) with i in this block, softmax over j (lse of i).
    else: x = f2, the tile is d(f1_i, f2_j) with j in this block, lse of each i in the stream.
    HALF_DOT: the (BM, BN) x (BN, BLOCK_DO) product on the tensor cores in the inputs' dtype.
    """
    xi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    xmask = xi < B
    x_sq = tl.load(x_sq_ptr + xi, mask=xmask, other=0.0)
    dpos_x = tl.load(dpos_ptr + xi, mask=xmask, other=0.0)
    if ROWS:
        lse_x = tl.load(lse_ptr + xi, mask=xmask, other=0.0)
    dd = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dd < D
    wsum = tl.zeros((BLOCK_M,), tl.float32)
    wy = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, B, SPLIT * BLOCK_N):
        yj = n0 + tl.arange(0, BLOCK_N)
        ymask = yj < B
        y_sq = tl.load(y_sq_ptr + yj, mask=ymask, other=0.0)
        # distances d(x_i, y_j); the exact diagonal is the same vector either way round
        d = _dist_tile(
            x_ptr,
            y_ptr,
            tl.program_id(0) * BLOCK_M,
            n0,
            B,
            D,
            stride_x,
            stride_y,
            x_sq,
            y_sq,
            dpos_x,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            PREC,
            UPCAST,
        )
        if ROWS:
            p = tl.exp(-d - lse_x[:, None])
        else:
            lse_y = tl.load(lse_ptr + yj, mask=ymask, other=0.0)
            p = tl.exp(-d - lse_y[None, :])
        g = p - tl.where(xi[:, None] == yj[None, :], 1.0, 0.0)  # (the 1/B scale is applied on the host)
        w = tl.where((d > 0.0) & xmask[:, None] & ymask[None, :], g / tl.where(d > 0.0, d, 1.0), 0.0)
        wsum += tl.sum(w, 1)
        y = tl.load(
            y_ptr + yj.to(tl.int64)[:, None] * stride_y + dd[None, :], mask=ymask[:, None] & dmask[None, :], other=0.0
        )
        if HALF_DOT:
            wy += tl.dot(w.to(y.dtype), y)
        else:
            wy += tl.dot(w, y.to(tl.float32), input_precision=PREC)
    x = tl.load(
        x_ptr + xi.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=xmask[:, None] & dmask[None, :], other=0.0
    )
    grad = -(wsum[:, None] * x.to(tl.float32) - wy)
    at = (tl.program_id(1) * B + xi.to(tl.int64))[:, None] * D + dd[None, :]
    tl.store(part_ptr + at, grad, mask=xmask[:, None] & dmask[None, :])


def configs(dtype: torch.dtype, tf32: bool = False, interp: bool | None = None):
    """The constexprs and launch options of the forward and backward kernels for inputs of
    ``dtype``: the one place the launchers and the compile tests (fastssl/kernels/compiled.py) read
    them.  ``interp``: for the Triton interpreter (default: as this process runs).

    One configuration per dtype, whatever B and D: 64 x 64 logit tiles, D in chunks of 32 (16 in
    the exact fp32 backward), the backward's output dimensions in blocks of 64 (32 for exact fp32)
    along a third grid axis, so
    shared memory and registers are bounded for any D.  8 warps; compiled for sm_90 none of them
    spills (exact fp32 on sm_80 spills a little in the backward; fastssl/kernels/compiled.py prints the
    table)."""
    up = upcast(dtype, interp)
    common = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, PREC=dot_precision(dtype, tf32), UPCAST=up, num_warps=8)
    fma = dtype == torch.float32 and not tf32  # exact fp32 products on the FMA units hold more registers
    # exact fp32 backward: D in chunks of 16 (of 32, the variant launched at D % 16 == 0 capped
    # itself at 128 registers and spilled 16 B on sm_90)
    bwd = dict(common, BLOCK_DO=32 if fma else 64, HALF_DOT=half(dtype) and not up, **({"BLOCK_D": 16} if fma else {}))
    return {"fwd": common, "bwd": bwd}


def splits(B: int, D: int, cfg) -> tuple:
    """Programs that share a block of rows (the column blocks split over a second grid axis),
    forward and backward, so that about TARGET_PROGRAMS run even for a batch of 256."""
    col_blocks = triton.cdiv(B, cfg["fwd"]["BLOCK_N"])
    rows = triton.cdiv(B, cfg["fwd"]["BLOCK_M"])
    return (
        grid_split(rows, TARGET_PROGRAMS, col_blocks),
        grid_split(rows * triton.cdiv(D, cfg["bwd"]["BLOCK_DO"]), TARGET_PROGRAMS, col_blocks),
    )


class SCLossFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1, f2, tf32):
        if f1.shape != f2.shape or f1.ndim != 2:
            raise ValueError(f"sc_loss: f1 and f2 must both be (B, D), got {tuple(f1.shape)} and {tuple(f2.shape)}")
        f1, f2 = f1.contiguous(), f2.contiguous()
        B, D = f1.shape
        a_sq = f1.float().pow(2).sum(1)
        b_sq = f2.float().pow(2).sum(1)
        dpos = (f1.float() - f2.float()).norm(dim=1)  # exact positives, O(B * D)
        cfg = configs(f1.dtype, tf32)
        split, _ = splits(B, D, cfg)
        pm = torch.empty(split, B, device=f1.device, dtype=torch.float32)
        ps = torch.empty_like(pm)
        with launch_device(f1):
            _sc_fwd[(triton.cdiv(B, cfg["fwd"]["BLOCK_M"]), split)](
                f1, f2, a_sq, b_sq, dpos, pm, ps, B, D, f1.stride(0), f2.stride(0), split, **cfg["fwd"]
            )
        m = pm.max(0).values
        lse = m + (ps * torch.exp(pm - m)).sum(0).log()
        ctx.save_for_backward(f1, f2, a_sq, b_sq, dpos, lse)
        ctx.tf32 = tf32
        return (lse + dpos).mean()

    @staticmethod
    def backward(ctx, gout):
        f1, f2, a_sq, b_sq, dpos, lse = ctx.saved_tensors
        B, D = f1.shape
        cfg = configs(f1.dtype, ctx.tf32)
        bwd = cfg["bwd"]
        _, split = splits(B, D, cfg)
        grid = (triton.cdiv(B, bwd["BLOCK_M"]), split, triton.cdiv(D, bwd["BLOCK_DO"]))
        parts = []
        with launch_device(f1):
            for rows, (x, y, x_sq, y_sq) in ((True, (f1, f2, a_sq, b_sq)), (False, (f2, f1, b_sq, a_sq))):
                part = torch.empty(split, B, D, device=f1.device, dtype=torch.float32)
                _sc_bwd[grid](
                    x, y, x_sq, y_sq, dpos, lse, part, B, D, x.stride(0), y.stride(0), split, ROWS=rows, **bwd
                )
                parts.append(part.sum(0))
        scale = gout / B
        return (parts[0] * scale).to(f1.dtype), (parts[1] * scale).to(f2.dtype), None


@no_autocast
def sc_loss_fused(f1: torch.Tensor, f2: torch.Tensor, tf32: bool = False) -> torch.Tensor:
    """Same signature and value as ``sc_loss_eager``; fp32/bf16/fp16 inputs, fp32 accumulation
    (``tf32``: fp32 inputs on the TF32 tensor cores)."""
    return SCLossFused.apply(f1, f2, tf32)
