"""Triplet loss (Euclidean, squared Euclidean or cosine distance, margin), with in-batch
hardest-negative or semi-hard mining.

    L = 1/B * sum_i max(0, d(a_i, p_i) - d(a_i, n_i*) + margin)

Without mining, n_i* = n_i and the loss is one O(B * D) pass: no pairwise matrix exists and
eager PyTorch already reads each input once.  With ``hardest=True``, n_i* is the candidate
closest to a_i among every negative n_j and every other image's positive p_j (j != i): the
O(B^2 * D) part.  The fused path mines it in one Triton kernel that streams candidate blocks
through on-chip memory keeping a running (min, argmin) per anchor, so the B x 2B distance
matrix is never written; the loss and its gradients are then taken on the gathered rows
(O(B * D); autograd scatters the negatives' gradients back).  ``triplet_loss_eager`` is the
reference, which materialises the matrix.  ``sqeuclidean`` mines the same hardest negatives as
``euclidean`` (the square is monotone): the kernel runs in Euclidean mode and the loss squares.

Semi-hard mining (``semihard_triplet_loss_eager``) is the online selection of Zhao et al.'s code
(the ``SemihardNegativeTripletSelector`` of their utils.py, after A. Bielski's siamese-triplet):
every patch of another group (crop) is a candidate negative of each (anchor, positive) pair; one
is drawn uniformly among those with 0 < d(a, p) - d(a, n) + margin < margin, a pair without one
is dropped, and the loss is the mean over the kept triplets.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import TARGET_PROGRAMS, dot_precision, dot_tile, grid_split, launch_device, no_autocast, upcast

DISTANCES = ("euclidean", "cosine", "sqeuclidean")


def pair_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Row-wise d(x_i, y_i) in fp32."""
    x, y = x.float(), y.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-8)
    if distance == "sqeuclidean":  # as the authors' losses.py: (a - p).pow(2).sum(1)
        return (x - y).pow(2).sum(1)
    return (x - y).norm(dim=1)


def _candidates(positive: torch.Tensor, negative: Optional[torch.Tensor]) -> torch.Tensor:
    return positive if negative is None else torch.cat([positive, negative])


@no_autocast
def hardest_negatives_eager(anchor, positive, negative=None, distance="euclidean") -> Tuple[torch.Tensor, torch.Tensor]:
    """(distance, index into cat([positive, negative])) of each anchor's hardest negative."""
    if distance == "sqeuclidean":  # same argmin as euclidean
        d, i = hardest_negatives_eager(anchor, positive, negative, "euclidean")
        return d.pow(2), i
    a, c = anchor.float(), _candidates(positive, negative).float()
    if distance == "cosine":
        d = 1.0 - F.normalize(a, dim=1, eps=1e-8) @ F.normalize(c, dim=1, eps=1e-8).t()
    else:
        d = torch.cdist(a, c, compute_mode="donot_use_mm_for_euclid_dist")
    B = a.shape[0]
    d[torch.arange(B), torch.arange(B)] = float("inf")  # an anchor's own positive is not a negative
    return d.min(dim=1)


def _loss_from(anchor, positive, neg_rows, margin, distance):
    d_ap = pair_distance(anchor, positive, distance)
    d_an = pair_distance(anchor, neg_rows, distance)
    return F.relu(d_ap - d_an + margin).mean()


def _check(anchor, positive, negative, distance, hardest):
    if distance not in DISTANCES:
        raise ValueError(f"triplet loss: distance must be one of {DISTANCES}, got {distance!r}")
    if anchor.shape != positive.shape or anchor.ndim != 2:
        raise ValueError(
            f"triplet loss: anchor and positive must both be (B, D), got {tuple(anchor.shape)}, {tuple(positive.shape)}"
        )
    if negative is None and not hardest:
        raise ValueError("triplet loss: negatives are required unless hardest=True (in-batch mining)")
    if negative is not None and negative.shape[1] != anchor.shape[1]:
        raise ValueError(f"triplet loss: negatives have dimension {negative.shape[1]}, anchors {anchor.shape[1]}")


@no_autocast
def triplet_loss_eager(
    anchor, positive, negative=None, margin: float = 0.5, distance: str = "euclidean", hardest: bool = False
) -> torch.Tensor:
    _check(anchor, positive, negative, distance, hardest)
    if not hardest:
        return _loss_from(anchor, positive, negative, margin, distance)
    _, idx = hardest_negatives_eager(anchor, positive, negative, distance)
    return _loss_from(anchor, positive, _candidates(positive, negative)[idx], margin, distance)


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
    c = _candidates(positive, negative)
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
    _check(anchor, positive, negative, distance, hardest)
    if not hardest:
        return _loss_from(anchor, positive, negative, margin, distance)
    with torch.no_grad():
        _, idx = hardest_negatives_fused(
            anchor.detach(), positive.detach(), None if negative is None else negative.detach(), distance, tf32
        )
    return _loss_from(anchor, positive, _candidates(positive, negative)[idx], margin, distance)


# ---- semi-hard mining (the authors' online selection)


def distance_matrix(x: torch.Tensor, distance: str) -> torch.Tensor:
    """d(x_i, x_j) for every pair of rows of ``x`` (N, D), fp32.  Squared Euclidean is the authors'
    ``utils.pdist`` (the matrix-product expansion, same operations in the same order); Euclidean
    its clamped square root; cosine 1 - cos."""
    x = x.float()
    if distance == "cosine":
        u = F.normalize(x, dim=1, eps=1e-8)
        return 1.0 - u @ u.t()
    d = -2 * x.mm(torch.t(x)) + x.pow(2).sum(dim=1).view(1, -1) + x.pow(2).sum(dim=1).view(-1, 1)
    return d if distance == "sqeuclidean" else d.clamp_min(0).sqrt()


def _check_semihard(embeddings, labels, pairs, u, distance):
    if distance not in DISTANCES:
        raise ValueError(f"triplet loss: distance must be one of {DISTANCES}, got {distance!r}")
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"semi-hard triplet loss: embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)}, "
            f"{tuple(labels.shape)}"
        )
    if pairs.ndim != 2 or pairs.shape[1] != 2 or u.shape != pairs.shape[:1]:
        raise ValueError(f"semi-hard triplet loss: pairs (P, 2) and u (P,), got {tuple(pairs.shape)}, {tuple(u.shape)}")


@no_autocast
def semihard_negatives(embeddings, labels, pairs, margin: float, distance: str, u) -> torch.Tensor:
    """Index of each pair's semi-hard negative, -1 where it has none.

    ``pairs`` (P, 2): (anchor, positive) row indices into ``embeddings`` (N, D); candidates are
    the rows whose label differs from the anchor's.  Pair k takes the ``floor(u[k] * count)``-th
    (0-based, ascending index) of its ``count`` candidates with 0 < d_ap - d_an + margin < margin,
    where the authors draw ``np.random.choice`` over the same ascending list: ``u`` (P,) float64
    in [0, 1) replaces their global numpy RNG (seeded and checkpointed with torch's here)."""
    _check_semihard(embeddings, labels, pairs, u, distance)
    with torch.no_grad():
        d = distance_matrix(embeddings.detach(), distance)
        a, p = pairs[:, 0], pairs[:, 1]
        lv = d[a, p][:, None] - d[a] + margin  # the authors' loss_values, fp32
        ok = (lv < margin) & (lv > 0) & (labels[a][:, None] != labels[None, :])
        count = ok.sum(1)
        k = torch.minimum((u.double() * count.double()).floor().long(), (count - 1).clamp_min(0))
        hit = ok & (ok.cumsum(1) == (k + 1)[:, None])
        return torch.where(count > 0, hit.int().argmax(1), torch.full_like(count, -1))


@no_autocast
def semihard_triplet_loss_eager(
    embeddings, labels, pairs, margin: float = 2.0, distance: str = "sqeuclidean", u=None
) -> Tuple[torch.Tensor, int]:
    """(loss, triplets kept): mean of max(0, d(a, p) - d(a, n) + margin) over the pairs that have a
    semi-hard negative (``semihard_negatives``).  Where no pair has one, the authors' fallback: the
    last pair with the first row of another label (their loop's last ``anchor_positive`` and
    ``negative_indices[0]``; pairs must then be ordered as they iterate: by label, then
    ``itertools.combinations`` order).  The loss's distances are taken on the gathered rows
    (``pair_distance``), as the authors' OnlineTripletLoss recomputes them."""
    if u is None:
        u = torch.rand(pairs.shape[0], dtype=torch.float64, device=embeddings.device)
    neg = semihard_negatives(embeddings, labels, pairs, margin, distance, u)
    keep = neg >= 0
    if bool(keep.any()):
        a, p, n = pairs[keep, 0], pairs[keep, 1], neg[keep]
    else:
        a, p = pairs[-1:, 0], pairs[-1:, 1]
        n = torch.nonzero(labels != labels[a], as_tuple=True)[0][:1]
    return _loss_from(embeddings[a], embeddings[p], embeddings[n], margin, distance), int(a.numel())


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
