"""Triplet loss, fused: the in-batch hardest-negative mining in one Triton kernel.

    L = 1/B * sum_i max(0, d(a_i, p_i) - d(a_i, n_i*) + margin)

Without mining, n_i* = n_i and the loss is one O(B * D) pass: no pairwise matrix exists and
eager PyTorch already reads each input once.  With ``hardest=True``, n_i* is the candidate
closest to a_i among every negative n_j and every other image's positive p_j (j != i): the
O(B^2 * D) part.  The fused path mines it in one Triton kernel that streams candidate blocks
through on-chip memory keeping a running (min, argmin) per anchor, so the B x 2B distance
matrix is never written; the loss and its gradients are then taken on the gathered rows
(O(B * D); autograd scatters the negatives' gradients back).  The reference, which
materialises the matrix, and the semi-hard selection are the eager forms in
fastssl/losses/triplet.py (``triplet_loss_eager``, ``semihard_triplet_loss_eager``), whose
``loss_from``, ``candidates`` and ``check_inputs`` the fused path shares.  ``sqeuclidean``
mines the same hardest negatives as ``euclidean`` (the square is monotone): the kernel runs in
Euclidean mode and the loss squares.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastssl.losses.precision import no_autocast
from fastssl.losses.triplet import candidates, check_inputs, loss_from, semihard_triplet_loss_eager

from ._common import TARGET_PROGRAMS, dot_precision, dot_tile, grid_split, launch_device, upcast


@triton.jit(do_not_specialize=["SPLIT"])  # (SPLIT: a count, not a size; one variant for any)
def _hardest_kernel(
    a_ptr,
    c_ptr,
    a_sq_ptr,
    c_sq_ptr,
    out_d_ptr,
    out_i_ptr,
    B,
    M,
    D,
    stride_a,
    stride_c,
    SPLIT,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Per anchor row: min and argmin over candidate rows j (j != row for j < B) of the distance,
    over every SPLIT-th candidate block from program_id(1) (partials, combined on the host).
    COSINE: inputs are unit vectors and d = 1 - a.c; else d = sqrt(|a|^2 + |c|^2 - 2 a.c)."""
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < B
    a_sq = tl.load(a_sq_ptr + rows, mask=rmask, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(tl.program_id(1) * BLOCK_N, M, SPLIT * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        acc = dot_tile(a_ptr, c_ptr, r0, n0, B, M, D, stride_a, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, PREC, UPCAST)
        if COSINE:
            d = 1.0 - acc
        else:
            c_sq = tl.load(c_sq_ptr + cols, mask=cmask, other=0.0)
            d = tl.sqrt(tl.maximum(a_sq[:, None] + c_sq[None, :] - 2.0 * acc, 0.0))
        d = tl.where(cmask[None, :] & (rows[:, None] != cols[None, :]), d, float("inf"))
        tile_min = tl.min(d, 1)
        tile_arg = tl.argmin(d, 1).to(tl.int32) + n0
        better = tile_min < best  # (ties keep the earlier block: the smallest index, as the eager twin)
        best_i = tl.where(better, tile_arg, best_i)
        best = tl.where(better, tile_min, best)
    at = tl.program_id(1) * B + rows
    tl.store(out_d_ptr + at, best, mask=rmask)
    tl.store(out_i_ptr + at, best_i, mask=rmask)


def configs(dtype: torch.dtype, tf32: bool = False, interp: Optional[bool] = None):
    """The mining kernel's constexprs and launch options for inputs of ``dtype`` (one per dtype,
    any B and D: D in chunks of 32), read by the launcher and by fastssl/kernels/compiled.py.  64 x 64
    tiles on 8 warps: no spills when compiled for sm_90."""
    return {
        "hardest": dict(
            BLOCK_M=64,
            BLOCK_N=64,
            BLOCK_D=32,
            PREC=dot_precision(dtype, tf32),
            UPCAST=upcast(dtype, interp),
            num_warps=8,
        )
    }


@no_autocast
def hardest_negatives_fused(
    anchor, positive, negative=None, distance="euclidean", tf32: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``hardest_negatives_eager`` without the B x M matrix."""
    if distance == "sqeuclidean":  # same argmin as euclidean: the kernel's Euclidean mode
        d, i = hardest_negatives_fused(anchor, positive, negative, "euclidean", tf32)
        return d.pow(2), i
    c = candidates(positive, negative)
    a = anchor
    if distance == "cosine":
        a, c = F.normalize(a.float(), dim=1, eps=1e-8).to(a.dtype), F.normalize(c.float(), dim=1, eps=1e-8).to(c.dtype)
    a, c = a.contiguous(), c.contiguous()
    B, D = a.shape
    M = c.shape[0]
    a_sq, c_sq = a.float().pow(2).sum(1), c.float().pow(2).sum(1)
    cfg = configs(a.dtype, tf32)["hardest"]
    split = grid_split(triton.cdiv(B, cfg["BLOCK_M"]), TARGET_PROGRAMS, triton.cdiv(M, cfg["BLOCK_N"]))
    out_d = torch.empty(split, B, device=a.device, dtype=torch.float32)
    out_i = torch.empty(split, B, device=a.device, dtype=torch.int32)
    with launch_device(a):
        _hardest_kernel[(triton.cdiv(B, cfg["BLOCK_M"]), split)](
            a, c, a_sq, c_sq, out_d, out_i, B, M, D, a.stride(0), c.stride(0), split, COSINE=distance == "cosine", **cfg
        )
    best = out_d.min(0).values
    # among the splits at the minimum, the smallest index (split s holds blocks s, s + SPLIT, ...)
    idx = torch.where(out_d == best, out_i, torch.iinfo(torch.int32).max).min(0).values
    return best, idx.long()


@no_autocast
def triplet_loss_fused(
    anchor,
    positive,
    negative=None,
    margin: float = 0.5,
    distance: str = "euclidean",
    hardest: bool = False,
    tf32: bool = False,
) -> torch.Tensor:
    """Same signature and value as ``triplet_loss_eager``; mining fused, gradients by autograd on
    the gathered rows."""
    check_inputs(anchor, positive, negative, distance, hardest)
    if not hardest:
        return loss_from(anchor, positive, negative, margin, distance)
    with torch.no_grad():
        _, idx = hardest_negatives_fused(
            anchor.detach(), positive.detach(), None if negative is None else negative.detach(), distance, tf32
        )
    return loss_from(anchor, positive, candidates(positive, negative)[idx], margin, distance)


@no_autocast
def semihard_triplet_loss_fused(
    embeddings, labels, pairs, margin: float = 2.0, distance: str = "sqeuclidean", u=None, tf32: bool = False
) -> Tuple[torch.Tensor, int]:
    """The eager selection, deliberately: there is no fused semi-hard kernel.  The draw is the
    k-th candidate inside a band, which a streaming kernel can only find in two passes (count,
    then locate), and the matrix it would avoid is small at the authors' scale (6 pairs x 4
    patches per crop: 3072 x 2048 fp32 = 25 MB at batch 512), so the eager twin is used for
    ``loss.impl=fused`` too (same value, bit for bit)."""
    return semihard_triplet_loss_eager(embeddings, labels, pairs, margin, distance, u)
