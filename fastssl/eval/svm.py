"""The STL-10 fold protocol (``--protocol svm-folds``) of Exemplar-CNN (Dosovitskiy et al. 2016).

Features (fastssl/features/maps.py): every stage's output map max-pooled to 2x2 and flattened,
all concatenated (for the Exemplar-CNN: conv1, conv2, conv3 and the fc layer run convolutionally).  A one-vs-all linear
SVM (scikit-learn ``LinearSVC`` on standardised features) is trained on each fold of labeled
train images and tested on the whole test split; the result is mean +- std over folds.  STL-10
brings its 10 predefined folds of 1,000 images (``fold_indices.txt``); other data get
``eval.svm_folds`` random folds of ``eval.svm_fold_size`` images.

Options for the authors' protocol (``EricArazo/ExemplarCNN``, ``evaluation/``; defaults unchanged):
``authors_features`` (fastssl/features/maps.py: conv1-3, fc1 and, given the classifier, fc2, each after its ReLU, max-pooled
to 2x2, each block L2-normalised), ``eval.svm_c_grid``, ``eval.svm_c_select`` and ``eval.svm_scale``
(C searched on a grid: by 3-fold cross-validation inside each fold, or, as the authors' notebook
does, by the test accuracy of each fold; LinearSVC on raw features with ``eval.svm_scale=false``), and
``extract_prerelu_conv`` (their clustering features: conv1-3 before ReLU, max-pooled 2x2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import numpy as np

from fastssl.errors import choice
from fastssl.eval.harness import repeat_runs
from fastssl.eval.ledger import NO_LEDGER

if TYPE_CHECKING:
    from fastssl.config import EvalConfig


def eval_folds(source, num_folds: int, fold_size: int, seed: int = 0) -> List[np.ndarray]:
    """The source's predefined folds (STL-10), else ``num_folds`` random folds of ``fold_size``."""
    if source.folds:
        return [np.asarray(f, np.int64) for f in source.folds]
    n = len(source.train)
    rng = np.random.default_rng(seed)
    return [rng.choice(n, min(fold_size, n), replace=False) for _ in range(num_folds)]


C_SELECT = ("cv", "test")


def svm_folds(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    folds: List[np.ndarray],
    settings: EvalConfig,
    *,
    ledger=NO_LEDGER,
    log=print,
):
    """One LinearSVC per fold (C ``settings.svm_c``), tested on the test split (``settings``: the
    ``eval`` node).  ``settings.svm_c_grid`` (not empty): C chosen per fold from the grid, by
    3-fold cross-validation on the fold's own images (``svm_c_select="cv"``) or by the test
    accuracy (``"test"``: what the authors' ``evaluation/eval_long.ipynb`` does; it selects on the
    test set, so its mean is optimistic).  ``svm_scale=False``: raw features, no StandardScaler
    (the authors)."""
    # scikit-learn (slow to import) only where SVMs are fit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    C, c_grid = settings.svm_c, list(settings.svm_c_grid) or None
    c_select, scale = settings.svm_c_select, settings.svm_scale
    choice(c_select, "eval.svm_c_select", C_SELECT)
    chosen = {}

    def make(c):
        return (
            make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=5000)) if scale else LinearSVC(C=c, max_iter=5000)
        )

    def fit_score(c, k):
        clf = make(c)
        clf.fit(train_x[folds[k]], train_y[folds[k]])
        return float((clf.predict(test_x) == test_y).mean() * 100)

    def run(k):
        ledger.check()  # one fit per fold, no epochs: the stop is looked at before each
        if not c_grid:
            return fit_score(C, k)
        if c_select == "test":
            accs = [fit_score(c, k) for c in c_grid]
            chosen[k] = float(c_grid[int(np.argmax(accs))])
            return max(accs)
        from sklearn.model_selection import GridSearchCV

        x, y = train_x[folds[k]], train_y[folds[k]]
        key = "linearsvc__C" if scale else "C"
        search = GridSearchCV(make(C), {key: list(c_grid)}, cv=3).fit(x, y)
        chosen[k] = float(search.best_params_[key])
        return float((search.best_estimator_.predict(test_x) == test_y).mean() * 100)

    def message(k, acc):
        c = f", C {chosen[k]:g}" if k in chosen else ""
        return f"  fold {k + 1}/{len(folds)}: {acc:.2f}% ({len(folds[k])} train images{c})"

    return repeat_runs(len(folds), run, ledger, log, message, fold_sizes=[int(len(f)) for f in folds])
