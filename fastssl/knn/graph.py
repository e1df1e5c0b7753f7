"""kNN graphs over a feature bank, and propagation over them (Invariance Propagation's positives).

* ``knn_graph``: each row's ``k`` most similar other rows (inner product; self excluded), found
  with a FAISS index of ``fastssl.knn`` (exact ``flat``, or approximate ``ivf`` / ``hnsw``).
* ``propagate``: every node within ``steps`` hops of each anchor, deduplicated, anchor excluded,
  as a padded (B, C) tensor; ``multiset=True``: every path's end, duplicates and the anchor kept
  (the authors' released code, WangFeng18/InvariancePropagation ``objective.py``).
* ``refresh_neighbours``: the ``k`` nearest bank entries of a batch of query features (the
  authors' per-step ``update_nn``: top k + 1, the anchor's own entry replaced by the (k+1)-th).

Both are pure functions of their tensors (no method state), usable by any method that keeps a
bank; they live in this folder so that a method imports them, never the other way round.
"""

from __future__ import annotations

import torch

from fastssl.knn import KNNIndex

__all__ = ["knn_graph", "propagate", "refresh_neighbours"]


def knn_graph(bank: torch.Tensor, k: int, kind: str = "flat") -> torch.Tensor:
    """(N, k) indices of each row's k most similar other rows (inner product), via FAISS.

    ``k`` is capped at N - 1.  The search asks for k + 1 neighbours and drops self (normally the
    first column); a row whose own index is not among them (an approximate index, or ties) drops
    its last column instead.  The result is on ``bank``'s device."""
    n = bank.shape[0]
    k = min(k, n - 1)
    _, idx = KNNIndex(bank, "ip", kind=kind).search(bank, k + 1)
    idx = idx.to(bank.device)
    self_mask = idx == torch.arange(n, device=bank.device)[:, None]
    # drop self (normally the first column); rows where self is absent drop their last column
    drop = torch.where(self_mask.any(1), self_mask.float().argmax(1), torch.full((n,), k, device=bank.device))
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[torch.arange(n), drop] = False
    return idx[keep].view(n, k)


def propagate(graph: torch.Tensor, anchors: torch.Tensor, steps: int, multiset: bool = False) -> torch.Tensor:
    """Images within ``steps`` hops of each anchor over ``graph`` (N, k): (B, C) with -1
    padding, deduplicated, anchor excluded.

    C = k + k^2 + ... + k^steps (every path's end, before deduplication); each row holds its
    distinct reached nodes in descending order, then -1.

    ``multiset``: the end of every path instead, unpadded, duplicates and the anchor kept, in
    the authors' order (the 1-step list, then each 1-step node's list, then each 2-step node's:
    ``InvariancePropagationLoss.propagate`` in their ``objective.py``, which concatenates the
    neighbour lists up to ``steps`` hops; their README calls it an approximation of the BFS)."""
    frontier = anchors[:, None]
    reached = []
    for _ in range(steps):
        frontier = graph[frontier].flatten(1)  # (B, |frontier| * k)
        reached.append(frontier)
    cand = torch.cat(reached, 1)
    if multiset:
        return cand
    cand, _ = cand.sort(1)
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    cand = cand.masked_fill(dup | (cand == anchors[:, None]), -1)
    return cand.sort(1, descending=True).values  # valid first, -1 last


@torch.no_grad()
def refresh_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, k: int, chunk: int = 65536
) -> torch.Tensor:
    """(B, k) new graph rows for the bank entries ``index``: the ``k`` bank entries most similar
    (inner product, fp32) to each query, the row's own entry excluded, exactly as the authors'
    ``InvariancePropagationLoss.update_nn`` builds them: the top k + 1, every column holding the
    own entry replaced by the (k+1)-th, the first k kept.  The bank is scanned ``chunk`` rows at
    a time (the B x N similarity matrix never exists whole)."""
    n = bank.shape[0]
    kk = min(k + 1, n)
    q = queries.float()
    vals, idx = [], []
    for c0 in range(0, n, chunk):
        sims = q @ bank[c0 : c0 + chunk].float().t()
        v, i = sims.topk(min(kk, sims.shape[1]), dim=1)
        vals.append(v)
        idx.append(i + c0)
    v, i = torch.cat(vals, 1), torch.cat(idx, 1)
    if len(vals) > 1:
        v, at = v.topk(kk, dim=1)
        i = i.gather(1, at)
    nei = i[:, :kk]
    nei = torch.where(nei == index[:, None], nei[:, -1:].expand_as(nei), nei)
    return nei[:, :k]
