"""Linear probe: a softmax classifier on frozen, standardised features; mean +- std over seeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastssl.eval.harness import repeat_runs, train_supervised
from fastssl.eval.ledger import NO_LEDGER

if TYPE_CHECKING:
    from fastssl.config import EvalConfig


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    settings: EvalConfig,
    *,
    num_classes: int,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    ledger=NO_LEDGER,
):
    """``settings.linear_seeds`` probes (seeds 0, 1, ...) of ``settings.linear_epochs`` epochs,
    SGD at ``settings.linear_lr`` with a cosine schedule (``settings``: the ``eval`` node)."""
    epochs, lr = settings.linear_epochs, settings.linear_lr
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        clf = torch.nn.Linear(xtr.shape[1], num_classes)
        torch.nn.init.normal_(clf.weight, std=0.01, generator=g)
        torch.nn.init.zeros_(clf.bias)
        train_supervised(
            clf,
            xtr,
            train_y,
            epochs,
            batch_size,
            xtr.device,
            generator=g,
            ledger=ledger,
            make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay),
            schedule=torch.optim.lr_scheduler.CosineAnnealingLR,
        )
        with torch.no_grad():
            return (clf(xte).argmax(1) == test_y).float().mean().item() * 100

    return repeat_runs(settings.linear_seeds, run, ledger)
