"""The STL-10 fold protocol (``--protocol svm-folds``) of Exemplar-CNN (Dosovitskiy et al. 2016).

Features: every stage's output map max-pooled to 2x2 and flattened, all concatenated (for the
Exemplar-CNN: conv1, conv2, conv3 and the fc layer run convolutionally).  A one-vs-all linear
SVM (scikit-learn ``LinearSVC`` on standardised features) is trained on each fold of labeled
train images and tested on the whole test split; the result is mean +- std over folds.  STL-10
brings its 10 predefined folds of 1,000 images (``fold_indices.txt``); other data get
``eval.svm_folds`` random folds of ``eval.svm_fold_size`` images.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.features import image_batches
from fastssl.eval.harness import repeat_runs
from fastssl.eval.ledger import NO_LEDGER


def pooled_features(backbone, x: torch.Tensor) -> torch.Tensor:
    """(B, sum_s 4 C_s): each stage's map max-pooled to 2x2 (1x1 maps are repeated)."""
    maps = backbone(x, backbone.stage_names)
    return torch.cat([F.adaptive_max_pool2d(m.float(), 2).flatten(1) for m in maps.values()], 1)


@torch.no_grad()
def extract_pooled(backbone, split, source, prepare, batch_size: int, device, index=None) -> torch.Tensor:
    backbone.eval()
    return torch.cat(
        [
            pooled_features(backbone, x).cpu()
            for x in image_batches(split, source.image_size, prepare, batch_size, device, index)
        ]
    )


def eval_folds(source, num_folds: int, fold_size: int, seed: int = 0) -> List[np.ndarray]:
    """The source's predefined folds (STL-10), else ``num_folds`` random folds of ``fold_size``."""
    if source.folds:
        return [np.asarray(f, np.int64) for f in source.folds]
    n = len(source.train)
    rng = np.random.default_rng(seed)
    return [rng.choice(n, min(fold_size, n), replace=False) for _ in range(num_folds)]


def svm_folds(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    folds: List[np.ndarray],
    C: float = 1.0,
    ledger=NO_LEDGER,
    log=print,
):
    # scikit-learn (slow to import) only where SVMs are fit: training imports this module for extract_pooled
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    def run(k):
        ledger.check()  # one fit per fold, no epochs: the stop is looked at before each
        clf = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=5000))
        clf.fit(train_x[folds[k]], train_y[folds[k]])
        return float((clf.predict(test_x) == test_y).mean() * 100)

    def message(k, acc):
        return f"  fold {k + 1}/{len(folds)}: {acc:.2f}% ({len(folds[k])} train images)"

    return repeat_runs(len(folds), run, ledger, log, message, fold_sizes=[int(len(f)) for f in folds])
