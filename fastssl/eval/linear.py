"""Linear probe: a softmax classifier on frozen, standardised features; mean +- std over seeds."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.ledger import NO_LEDGER


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 seeds: int = 3, weight_decay: float = 1e-4, batch_size: int = 256, ledger=NO_LEDGER):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    accs = []
    for seed in range(seeds):
        if ledger.has(seed):
            accs.append(ledger.get(seed))
            continue
        g = torch.Generator().manual_seed(seed)
        clf = torch.nn.Linear(xtr.shape[1], num_classes)
        torch.nn.init.normal_(clf.weight, std=0.01, generator=g)
        torch.nn.init.zeros_(clf.bias)
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        steps = epochs * max(1, (len(xtr) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(epochs):
            ledger.check()
            perm = torch.randperm(len(xtr), generator=g)
            for s in range(0, len(xtr), batch_size):
                b = perm[s:s + batch_size]
                loss = F.cross_entropy(clf(xtr[b]), train_y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            accs.append((clf(xte).argmax(1) == test_y).float().mean().item() * 100)
        ledger.add(seed, accs[-1])
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
