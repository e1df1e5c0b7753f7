"""Triplet loss, eager (the reference of the fused mining kernel in fastssl/kernels/triplet.py):
Euclidean, squared Euclidean or cosine distance, margin, with in-batch hardest-negative or
semi-hard mining.

    L = 1/B * sum_i max(0, d(a_i, p_i) - d(a_i, n_i*) + margin)

Without mining, n_i* = n_i (one O(B * D) pass).  With ``hardest=True``, n_i* is the candidate
closest to a_i among every negative n_j and every other image's positive p_j (j != i);
``triplet_loss_eager`` materialises the B x 2B distance matrix to find it, the fused path streams
it (fastssl/kernels/triplet.py) and shares ``loss_from``, ``candidates`` and ``check_inputs``
from here.  ``sqeuclidean`` mines the same hardest negatives as ``euclidean`` (the square is
monotone).

Semi-hard mining (``semihard_triplet_loss_eager``) is the online selection of Zhao et al.'s code
(the ``SemihardNegativeTripletSelector`` of their utils.py, after A. Bielski's siamese-triplet):
every patch of another group (crop) is a candidate negative of each (anchor, positive) pair; one
is drawn uniformly among those with 0 < d(a, p) - d(a, n) + margin < margin, a pair without one
is dropped, and the loss is the mean over the kept triplets.  There is no fused semi-hard kernel
(fastssl/kernels/triplet.py says why).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastssl.losses.precision import no_autocast

DISTANCES = ("euclidean", "cosine", "sqeuclidean")


def pair_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Row-wise d(x_i, y_i) in fp32."""
    x, y = x.float(), y.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-8)
    if distance == "sqeuclidean":  # as the authors' losses.py: (a - p).pow(2).sum(1)
        return (x - y).pow(2).sum(1)
    return (x - y).norm(dim=1)


def candidates(positive: torch.Tensor, negative: Optional[torch.Tensor]) -> torch.Tensor:
    return positive if negative is None else torch.cat([positive, negative])


@no_autocast
def hardest_negatives_eager(anchor, positive, negative=None, distance="euclidean") -> Tuple[torch.Tensor, torch.Tensor]:
    """(distance, index into cat([positive, negative])) of each anchor's hardest negative."""
    if distance == "sqeuclidean":  # same argmin as euclidean
        d, i = hardest_negatives_eager(anchor, positive, negative, "euclidean")
        return d.pow(2), i
    a, c = anchor.float(), candidates(positive, negative).float()
    if distance == "cosine":
        d = 1.0 - F.normalize(a, dim=1, eps=1e-8) @ F.normalize(c, dim=1, eps=1e-8).t()
    else:
        d = torch.cdist(a, c, compute_mode="donot_use_mm_for_euclid_dist")
    B = a.shape[0]
    d[torch.arange(B), torch.arange(B)] = float("inf")  # an anchor's own positive is not a negative
    return d.min(dim=1)


def loss_from(anchor, positive, neg_rows, margin, distance):
    d_ap = pair_distance(anchor, positive, distance)
    d_an = pair_distance(anchor, neg_rows, distance)
    return F.relu(d_ap - d_an + margin).mean()


def check_inputs(anchor, positive, negative, distance, hardest):
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
    check_inputs(anchor, positive, negative, distance, hardest)
    if not hardest:
        return loss_from(anchor, positive, negative, margin, distance)
    _, idx = hardest_negatives_eager(anchor, positive, negative, distance)
    return loss_from(anchor, positive, candidates(positive, negative)[idx], margin, distance)


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
    return loss_from(embeddings[a], embeddings[p], embeddings[n], margin, distance), int(a.numel())
