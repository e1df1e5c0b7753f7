"""Invariance Propagation's memory-bank loss, fused: the batch's similarities to every entry of
a bank of N features stream through on-chip memory once; the B x N matrix never exists.

    logits = f @ bank.T / temperature                 (B, N), only ever a tile at a time
    lse    = log sum_{j in top-K of the row} exp(logits_j)      (K = 0: the whole bank)

The fused part is that log-sum-exp and its gradient.  The rest of the loss (the anchor's own
entry, its propagated positives: O(B * (1 + C) * D) gathered rows) is ordinary autograd over
gathered bank rows, in ``combine``, shared with the eager twin ``bank_loss_eager`` (both in
fastssl/losses/bank_loss.py).

Top-K (K up to 4,096 and more) by exact sample-select, in one pass over the bank:

1. threshold: each row's logits against a strided sample of S ~ 8K + 4,096 bank entries
   (a small matmul), and the value above which 1.5 K * S / N of them lie.  About 1.5 K entries
   of the whole bank lie above it.
2. ``_bank_scan`` (one program per tile of BN bank entries, looping over the batch): the logit
   tile, then every entry at or above its row's threshold is appended to the row's candidate
   list (an atomic counter per row reserves the slots, a prefix sum places them).
3. ``torch.topk`` of each row's candidates (at most 3 K + 256 of them) is the exact top-K when
   the row has at least K candidates and its list did not overflow; rows where either fails
   (the sample misjudged, or massive ties) are recomputed exactly against the whole bank in
   eager PyTorch; ``last_fallback_rows()`` says how many.

Backward: dlse/df_i = 1/temperature * sum_j softmax_j bank_j over the row's top-K, a gather of K bank
rows per batch row (``_bank_grad_topk``), or, for the whole bank, a second streaming pass
(``_bank_grad_full``).  The bank is not differentiated (InvP updates it by EMA).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastssl.losses.bank_loss import BankLossSettings, check_inputs, combine
from fastssl.losses.precision import no_autocast

from ._common import TARGET_PROGRAMS, dot_precision, dot_tile, grid_split, half, launch_device, upcast

_STATS = {"fallback_rows": 0}


def last_fallback_rows() -> int:
    """Rows of the last fused top-K call recomputed eagerly (0 in the normal case)."""
    return _STATS["fallback_rows"]


@no_autocast
def bank_loss_fused(
    f: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    pos: torch.Tensor,
    settings: BankLossSettings,
    tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same arguments (and ``tf32``: an fp32 bank on the TF32 tensor cores) and values as
    ``bank_loss_eager``; fp32/bf16/fp16, fp32 accumulation."""
    check_inputs(f, bank, index, pos)
    temperature = settings.temperature
    lse, top = bank_lse(f, bank, temperature, settings.background, tf32=tf32)
    ff = f.float()
    self_logit = (ff * bank[index].float()).sum(1) / temperature
    self_in = (top == index[:, None]).any(1) if top is not None else torch.ones_like(index, dtype=torch.bool)
    pos_logits = torch.einsum("bd,bcd->bc", ff, bank[pos.clamp(min=0)].float()) / temperature
    return combine(lse, self_in, self_logit, pos_logits, pos >= 0, settings.hard_positives, settings.most_similar)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(
    f_ptr,
    bank_ptr,
    r0,
    c0,
    B,
    N,
    D,
    stride_f,
    stride_b,
    inv_temperature,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BM, BN) fp32 logits f[r0 : r0 + BM] . bank[c0 : c0 + BN] / temperature."""
    acc = dot_tile(f_ptr, bank_ptr, r0, c0, B, N, D, stride_f, stride_b, BM, BN, BLOCK_D, PREC, UPCAST)
    return acc * inv_temperature


@triton.jit
def _bank_scan(
    f_ptr,
    bank_ptr,
    thr_ptr,
    cnt_ptr,
    cval_ptr,
    cidx_ptr,
    pm_ptr,
    ps_ptr,
    B,
    N,
    D,
    stride_f,
    stride_b,
    inv_temperature,
    CAP,
    COLLECT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One tile of BN bank entries against the whole batch.  COLLECT: append entries at or
    above the row threshold to the row's candidates.  Else: this tile's (max, sum exp) per row."""
    pid = tl.program_id(0)
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < N
    for m0 in range(0, B, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < B
        logits = _logit_tile(
            f_ptr, bank_ptr, m0, pid * BN, B, N, D, stride_f, stride_b, inv_temperature, BM, BN, BLOCK_D, PREC, UPCAST
        )
        valid = rmask[:, None] & cmask[None, :]
        if COLLECT:
            thr = tl.load(thr_ptr + rows, mask=rmask, other=float("inf"))
            take = (valid & (logits >= thr[:, None])).to(tl.int32)
            base = tl.atomic_add(cnt_ptr + rows, tl.sum(take, 1), mask=rmask)  # reserves the slots
            slot = base[:, None] + tl.cumsum(take, 1) - 1
            keep = (take > 0) & (slot < CAP)
            at = rows[:, None].to(tl.int64) * CAP + slot
            tl.store(cval_ptr + at, logits, mask=keep)
            tl.store(cidx_ptr + at, cols[None, :] + 0 * rows[:, None], mask=keep)
        else:
            logits = tl.where(valid, logits, float("-inf"))
            m = tl.where(rmask, tl.max(logits, 1), 0.0)  # (rows past B: no -inf - -inf)
            s = tl.sum(tl.exp(logits - m[:, None]), 1)
            tl.store(pm_ptr + pid * B + rows, m, mask=rmask)
            tl.store(ps_ptr + pid * B + rows, s, mask=rmask)


@triton.jit(do_not_specialize=["SPLIT"])  # (SPLIT: a count, not a size; one variant for any)
def _bank_grad_full(
    f_ptr,
    bank_ptr,
    lse_ptr,
    part_ptr,
    B,
    N,
    D,
    stride_f,
    stride_b,
    inv_temperature,
    SPLIT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HALF_DOT: tl.constexpr,
):
    """sum_j softmax_j bank_j for a block of rows over every SPLIT-th tile of the bank, output
    dimensions [program_id(2) * BLOCK_DO, + BLOCK_DO) (the logits always use all D, in BLOCK_D
    chunks).  HALF_DOT: the probabilities x bank product on the tensor cores in the bank's dtype."""
    r0 = tl.program_id(0) * BM
    rows = r0 + tl.arange(0, BM)
    rmask = rows < B
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    dd = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    jj = tl.arange(0, BN)
    acc = tl.zeros((BM, BLOCK_DO), tl.float32)
    for n0 in range(tl.program_id(1) * BN, N, SPLIT * BN):
        cmask = n0 + jj < N
        logits = _logit_tile(
            f_ptr, bank_ptr, r0, n0, B, N, D, stride_f, stride_b, inv_temperature, BM, BN, BLOCK_D, PREC, UPCAST
        )
        p = tl.where(rmask[:, None] & cmask[None, :], tl.exp(logits - lse[:, None]), 0.0)
        blk = bank_ptr + tl.cast(n0, tl.int64) * stride_b  # 64-bit block offset (N x D > 2^31)
        b = tl.load(blk + jj[:, None] * stride_b + dd[None, :], mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
        if HALF_DOT:
            acc += tl.dot(p.to(b.dtype), b)
        else:
            acc += tl.dot(p, b.to(tl.float32), input_precision=PREC)
    at = (tl.program_id(1) * B + rows[:, None]).to(tl.int64) * D + dd[None, :]
    tl.store(part_ptr + at, acc, mask=rmask[:, None] & (dd[None, :] < D))


@triton.jit
def _bank_grad_topk(bank_ptr, idx_ptr, w_ptr, grad_ptr, K, D, stride_b, BK: tl.constexpr, BLOCK_DO: tl.constexpr):
    """grad_i = sum_j w_ij bank[idx_ij] over the row's K entries (one program per row and block
    of BLOCK_DO output dimensions)."""
    row = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros((BLOCK_DO,), tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        idx = tl.load(idx_ptr + row * K + kk, mask=km, other=0)  # int64 entries: 64-bit offsets
        w = tl.load(w_ptr + row * K + kk, mask=km, other=0.0)
        b = tl.load(bank_ptr + idx[:, None] * stride_b + dd[None, :], mask=km[:, None] & (dd[None, :] < D), other=0.0)
        acc += tl.sum(w[:, None] * b.to(tl.float32), 0)
    tl.store(grad_ptr + row * D + dd, acc, mask=dd < D)


# ----------------------------------------------------------------------------- launchers


def configs(dtype: torch.dtype, tf32: bool = False, interp: Optional[bool] = None):
    """Constexprs and launch options of every bank kernel for a bank of ``dtype`` (one set per
    dtype, any B, N and D: D in chunks of 32, gradient dimensions in blocks of 64), read by the
    launchers and by fastssl/kernels/compiled.py; 64 x 64 logit tiles on 8 warps, no spills on sm_90
    (exact fp32 on sm_80's FMA units spills a little: bf16, fp16 and TF32 do not)."""
    up = upcast(dtype, interp)
    fma = dtype == torch.float32 and not tf32  # exact fp32 products on the FMA units hold more registers
    tile = dict(BM=64, BN=64, BLOCK_D=32, PREC=dot_precision(dtype, tf32), UPCAST=up, num_warps=8)
    return {
        "scan": tile,
        "grad_full": dict(tile, BLOCK_DO=32 if fma else 64, HALF_DOT=half(dtype) and not up),
        "grad_topk": dict(BK=32, BLOCK_DO=64, num_warps=4),
    }


def _thresholds(f, bank, temperature, k, sample_stride: Optional[int]):
    """Per-row logit above which ~1.5 K of the bank's entries lie, from a strided sample."""
    N = bank.shape[0]
    stride = sample_stride or max(1, N // (8 * k + 4096))
    sample = bank[::stride]
    logits = f.float() @ sample.float().t() / temperature
    ks = k if stride == 1 else min(sample.shape[0], math.ceil(1.5 * k * sample.shape[0] / N) + 4)
    thr = logits.topk(ks, dim=1).values[:, -1]
    return thr - 1e-4 * thr.abs().clamp(min=1.0)  # the kernel's dot may round the other way


def _topk_rows(f, bank, temperature, k, sample_stride, tf32):
    """Exact (values, indices) of each row's top-K logits, in one streaming pass."""
    B, D = f.shape
    N = bank.shape[0]
    cap = 3 * k + 256
    thr = _thresholds(f, bank, temperature, k, sample_stride)
    cnt = torch.zeros(B, device=f.device, dtype=torch.int32)
    cval = torch.full((B, cap), float("-inf"), device=f.device, dtype=torch.float32)
    cidx = torch.zeros((B, cap), device=f.device, dtype=torch.int32)
    cfg = configs(f.dtype, tf32)["scan"]
    with launch_device(f):
        _bank_scan[(triton.cdiv(N, cfg["BN"]),)](
            f,
            bank,
            thr,
            cnt,
            cval,
            cidx,
            cval,
            cval,
            B,
            N,
            D,
            f.stride(0),
            bank.stride(0),
            1.0 / temperature,
            cap,
            COLLECT=True,
            **cfg,
        )
    vals, at = cval.topk(k, dim=1)
    idx = cidx.gather(1, at).long()
    bad = ((cnt < k) | (cnt > cap)).nonzero()[:, 0]
    _STATS["fallback_rows"] = int(bad.numel())
    if bad.numel():  # exact, against the whole bank, for these rows only
        vals[bad], idx[bad] = (f[bad].float() @ bank.float().t() / temperature).topk(k, dim=1)
    return vals, idx


def _full_lse(f, bank, temperature, tf32):
    B, D = f.shape
    N = bank.shape[0]
    cfg = configs(f.dtype, tf32)["scan"]
    tiles = triton.cdiv(N, cfg["BN"])
    pm = torch.empty(tiles, B, device=f.device, dtype=torch.float32)
    ps = torch.empty_like(pm)
    with launch_device(f):
        _bank_scan[(tiles,)](
            f,
            bank,
            pm,
            pm,
            pm,
            pm,
            pm,
            ps,
            B,
            N,
            D,
            f.stride(0),
            bank.stride(0),
            1.0 / temperature,
            0,
            COLLECT=False,
            **cfg,
        )
    m = pm.max(0).values
    return m + (ps * torch.exp(pm - m)).sum(0).log()


class BankLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, bank, temperature, k, sample_stride, tf32):
        ctx.temperature, ctx.in_dtype, ctx.tf32 = temperature, f.dtype, tf32
        f = f.to(bank.dtype).contiguous()
        bank = bank.detach().contiguous()
        N = bank.shape[0]
        if 0 < k < N:
            vals, idx = _topk_rows(f, bank, temperature, k, sample_stride, tf32)
            lse = vals.logsumexp(1)
            ctx.save_for_backward(bank, idx, vals, lse)
            ctx.full = False
            ctx.mark_non_differentiable(idx)
            return lse, idx
        lse = _full_lse(f, bank, temperature, tf32)
        ctx.save_for_backward(f, bank, lse)
        ctx.full = True
        return lse, torch.empty(0, dtype=torch.long, device=f.device)

    @staticmethod
    def backward(ctx, g_lse, _g_idx):
        B = g_lse.shape[0]
        if ctx.full:
            f, bank, lse = ctx.saved_tensors
            N, D = bank.shape
            cfg = configs(f.dtype, ctx.tf32)["grad_full"]
            blocks = triton.cdiv(B, cfg["BM"]) * triton.cdiv(D, cfg["BLOCK_DO"])
            split = grid_split(blocks, TARGET_PROGRAMS, min(64, triton.cdiv(N, cfg["BN"])))
            part = torch.empty(split, B, D, device=f.device, dtype=torch.float32)
            with launch_device(f):
                _bank_grad_full[(triton.cdiv(B, cfg["BM"]), split, triton.cdiv(D, cfg["BLOCK_DO"]))](
                    f, bank, lse, part, B, N, D, f.stride(0), bank.stride(0), 1.0 / ctx.temperature, split, **cfg
                )
            grad = part.sum(0)
        else:
            bank, idx, vals, lse = ctx.saved_tensors
            D = bank.shape[1]
            w = torch.exp(vals - lse[:, None]).contiguous()
            grad = torch.empty(B, D, device=bank.device, dtype=torch.float32)
            cfg = configs(bank.dtype)["grad_topk"]
            with launch_device(bank):
                _bank_grad_topk[(B, triton.cdiv(D, cfg["BLOCK_DO"]))](
                    bank, idx.contiguous(), w, grad, idx.shape[1], D, bank.stride(0), **cfg
                )
        grad = grad * (g_lse.float()[:, None] / ctx.temperature)
        return grad.to(ctx.in_dtype), None, None, None, None, None


@no_autocast
def bank_lse(
    f: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    k: int,
    sample_stride: Optional[int] = None,
    tf32: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per row: log-sum-exp of its top-``k`` logits f @ bank.T / temperature (k = 0 or >= N: all of
    them) and the top-k entries' indices (None for the whole bank).  Differentiable in f.
    ``sample_stride`` overrides the threshold sample's stride (tests); ``tf32``: fp32 banks on the
    TF32 tensor cores."""
    lse, idx = BankLSE.apply(f, bank, temperature, int(k), sample_stride, tf32)
    return lse, (idx if idx.numel() else None)
