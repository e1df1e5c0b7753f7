"""Surrogate-class merging for Exemplar-CNN (Dosovitskiy et al. 2016; Bautista et al., "Clustering").

1. Complete-linkage agglomerative clustering (SciPy) of L2-normalised features of one half of
   the images, cut where the largest distance inside a cluster reaches ``threshold`` or the
   cluster would grow past ``max_size`` images (the paper's clusters hold up to 7).  Clusters of
   two or more images become classes (largest first, up to the class budget).  The size cap
   keeps a threshold that is loose for a set's features (every distance below it) from putting
   the whole half into one class: a merge above the cap is not made, and neither is any merge
   above it in the tree.
2. The budget is filled with single images of that half that are in no such cluster, each
   joined by its ``neighbours`` nearest images of the held-out half (cosine similarity, FAISS
   inner-product index; every held-out image joins at most one class).

Complete linkage needs all pairwise distances: SciPy keeps a condensed float64
matrix, n (n - 1) / 2 x 8 bytes (8,000 images: 256 MB, 20,000: 1.6 GB).  Beyond ``max_images``
the half is first split by FAISS k-means into parts of at most ``max_images`` and each part is
clustered alone: exact within a part; a cluster can no longer straddle two parts.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from fastssl.knn import KNNIndex


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cut_tree(Z: np.ndarray, n: int, threshold: float, max_size: int = 0) -> np.ndarray:
    """Cluster id per leaf of the SciPy linkage ``Z``: the largest subtrees whose merges all lie
    below ``threshold`` and hold at most ``max_size`` leaves (0: no cap)."""
    ok = np.ones(2 * n - 1, bool)
    root = np.arange(n)  # union-find over the leaves
    rep = np.arange(2 * n - 1)  # a leaf of every node

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for k, (a, b, d, cnt) in enumerate(Z):
        a, b, node = int(a), int(b), n + k
        rep[node] = rep[a]
        ok[node] = ok[a] and ok[b] and d < threshold and (max_size <= 0 or cnt <= max_size)
        if ok[node]:
            root[find(rep[b])] = find(rep[a])
    _, lab = np.unique([find(i) for i in range(n)], return_inverse=True)
    return lab.astype(np.int64)


def _kmeans_parts(x: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """The k-means part of each row (20 iterations): FAISS's k-means, or scikit-learn's where FAISS
    is not installed (said once; the parts, hence the clusters, then differ from a FAISS run's)."""
    from fastssl.knn import NO_FAISS, have_faiss, say_once

    if have_faiss():
        import faiss

        km = faiss.Kmeans(x.shape[1], parts, niter=20, seed=seed)
        km.train(x)
        _, assign = km.index.search(x, 1)
        return assign.reshape(-1)
    from sklearn.cluster import KMeans

    say_once("no_faiss", NO_FAISS)
    return KMeans(parts, n_init=1, max_iter=20, random_state=seed).fit_predict(x).astype(np.int64)


def complete_linkage(
    feats: np.ndarray, threshold: float, max_images: int = 20000, seed: int = 0, max_size: int = 0
) -> np.ndarray:
    """Cluster id per row (complete linkage, Euclidean, cut at ``threshold`` and ``max_size``)."""
    from scipy.cluster.hierarchy import linkage

    n = len(feats)
    if n < 2:
        return np.zeros(n, np.int64)
    if n <= max_images:
        return cut_tree(linkage(np.asarray(feats, np.float64), method="complete"), n, threshold, max_size)
    parts = int(np.ceil(2 * n / max_images))  # k-means parts are uneven: aim at half the cap
    assign = _kmeans_parts(np.ascontiguousarray(feats, np.float32), parts, seed)
    out, offset = np.empty(n, np.int64), 0
    for p in range(parts):
        rows = np.flatnonzero(assign == p)
        for s in range(0, len(rows), max_images):  # a part over the cap is cut in pieces
            r = rows[s : s + max_images]
            lab = complete_linkage(feats[r], threshold, max_images, seed, max_size)
            out[r] = lab + offset
            offset += int(lab.max()) + 1 if len(lab) else 0
    return out


def merge_classes(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    budget: int,
    threshold: float = 1.25,
    neighbours: int = 3,
    max_images: int = 20000,
    seed: int = 0,
    max_size: int = 0,
) -> Tuple[list, dict]:
    """Classes as lists of ``("a", row)`` / ``("b", row)`` members (rows of ``feats_a``, the
    clustered half, and ``feats_b``, the held-out half), and a summary for the log."""
    fa, fb = _normalise(feats_a), _normalise(feats_b)
    lab = complete_linkage(fa, threshold, max_images, seed, max_size)
    ids, counts = np.unique(lab, return_counts=True)
    multi = ids[counts >= 2][np.argsort(-counts[counts >= 2], kind="stable")][:budget]
    classes = [[("a", int(r)) for r in np.flatnonzero(lab == c)] for c in multi]
    in_cluster = np.isin(lab, multi)
    singles = np.random.default_rng(seed).permutation(np.flatnonzero(~in_cluster))[: budget - len(classes)]
    used = np.zeros(len(fb), bool)
    joined = 0
    if len(singles) and len(fb) and neighbours > 0:
        index = KNNIndex(torch.from_numpy(fb), metric="ip", use_gpu=None)
        _, nn = index.search(torch.from_numpy(fa[singles]), min(len(fb), 4 * neighbours + 8))
        nn = nn.numpy()
    for i, s in enumerate(singles):
        members = [("a", int(s))]
        if len(fb) and neighbours > 0:
            for j in nn[i]:
                if len(members) > neighbours:
                    break
                if j >= 0 and not used[j]:
                    used[j] = True
                    members.append(("b", int(j)))
        joined += len(members) - 1
        classes.append(members)
    sizes = [len(c) for c in classes]
    summary = {
        "clusters": len(multi),
        "largest": int(max(counts)) if len(counts) else 0,
        "singles": len(singles),
        "joined": joined,
        "classes": len(classes),
        "images": int(sum(sizes)),
        "mean_size": float(np.mean(sizes)) if sizes else 0.0,
    }
    return classes, summary


def surrogate_classes(features, n: int, budget: int, c, seed: int) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Exemplar-CNN's clustering stage over ``n`` images: a ``c.fraction`` of them (drawn from
    ``seed``) clustered, the rest held out to join the clusters (``merge_classes``, with ``c``'s
    threshold, neighbours, max_images and max_size); ``features(rows)`` gives the trained network's
    (len(rows), D) features.  Returns the images of the new surrogate classes, their class
    labels and the summary for the log."""
    perm = np.random.default_rng([seed, 17]).permutation(n)
    half = perm[: int(round(c.fraction * n))]
    held = perm[len(half) :]
    classes, summary = merge_classes(
        features(half), features(held), budget, c.threshold, c.neighbours, c.max_images, seed, c.max_size
    )
    members = np.array([half[r] if w == "a" else held[r] for cl in classes for w, r in cl], np.int64)
    labels = np.array([k for k, cl in enumerate(classes) for _ in cl], np.int64)
    return members, labels, summary
