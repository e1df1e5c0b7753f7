"""Weighted kNN classifier (Wu et al. 2018): votes exp(cos / T) of the K nearest train images.

Used by the kNN evaluation protocol (``python -m fastssl.eval --protocol knn``), the online kNN
monitor (fastssl/engine/monitors.py) and InvP's monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.knn import KNNIndex


def knn_classify(
    train_x, train_y, test_x, num_classes: int, k: int = 200, temperature: float = 0.07, batch_size: int = 1024
) -> torch.Tensor:
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    index = KNNIndex(train_x, metric="ip")
    preds = []
    for s in range(0, len(test_x), batch_size):
        sims, idx = index.search(test_x[s : s + batch_size], k)
        votes = torch.zeros(len(idx), num_classes)
        votes.scatter_add_(1, train_y[idx.cpu()], (sims.cpu() / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = 200, temperature: float = 0.07):
    pred = knn_classify(train_x, train_y, test_x, num_classes, k, temperature)
    return {"accuracy": (pred == test_y).float().mean().item() * 100, "k": k, "temperature": temperature}
