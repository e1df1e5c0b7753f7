"""Linear probe: a softmax classifier on frozen, standardised features; mean +- std over seeds."""

from __future__ import annotations

import torch

from fastssl.eval.harness import repeat_runs, train_supervised
from fastssl.eval.ledger import NO_LEDGER


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    seeds: int = 3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    ledger=NO_LEDGER,
):
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

    return repeat_runs(seeds, run, ledger)
