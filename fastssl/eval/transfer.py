"""Transfer protocol of the layer-wise contrastive paper: the learned first layer, frozen or
fine-tuned, inside a small classifier (that layer + one more conv + 2 fully connected layers)
trained with labels; Adam, lr 1e-3 for the first two thirds of training and 1e-4 after; mean
+- std over several runs (the transferred filters stay the same across runs)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.eval.features import image_batches
from fastssl.eval.ledger import NO_LEDGER


class SmallClassifier(nn.Module):
    def __init__(self, first: nn.Module, first_channels: int, image_size: int, num_classes: int, width: int = 64):
        super().__init__()
        self.first = first  # conv + ReLU + max-pool, transferred
        self.conv2 = nn.Sequential(nn.Conv2d(first_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        with torch.no_grad():
            n = self.conv2(self.first(torch.zeros(1, 3, image_size, image_size))).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.fc(self.conv2(self.first(x)))


def transfer(backbone, source, prepare, num_classes, epochs, runs, freeze, batch_size, device, labels_n=None, log=print,
             ledger=NO_LEDGER):
    from fastssl.eval.finetune import balanced_subset

    first = backbone.stages["layer1"]
    y_all = np.asarray(source.train.labels)
    idx = balanced_subset(y_all, labels_n, num_classes, 0) if labels_n else np.arange(len(y_all))
    x = torch.cat(list(image_batches(source.train, source.image_size, prepare, 512, "cpu", idx)))
    y = torch.from_numpy(y_all[idx])
    xt = torch.cat(list(image_batches(source.test, source.image_size, prepare, 512, "cpu")))
    yt = torch.from_numpy(np.asarray(source.test.labels))
    accs = []
    for run in range(runs):
        if ledger.has(run):
            accs.append(ledger.get(run))
            continue
        torch.manual_seed(1000 + run)  # the new layers' init and the batch order differ per run
        net = SmallClassifier(copy.deepcopy(first), backbone.dim("layer1"), source.image_size, num_classes).to(device)
        for p in net.first.parameters():
            p.requires_grad_(not freeze)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        switch = int(round(2 * epochs / 3))
        for ep in range(epochs):
            ledger.check()
            if ep == switch:
                for gr in opt.param_groups:
                    gr["lr"] = 1e-4
            net.train()
            perm = torch.randperm(len(x))
            for s in range(0, len(x), batch_size):
                b = perm[s:s + batch_size]
                loss = F.cross_entropy(net(x[b].to(device)), y[b].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            correct = sum((net(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                          for xb, yb in zip(xt.split(512), yt.split(512)))
        accs.append(100.0 * correct / len(xt))
        ledger.add(run, accs[-1])
        log(f"  transfer run {run}: {accs[-1]:.2f}% ({'frozen' if freeze else 'fine-tuned'} first layer, {epochs} epochs)")
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs, "frozen": freeze,
            "labels": int(len(idx))}
