"""Fine-tune protocol of the SC paper: the pre-trained backbone initialises a supervised
classifier (backbone + linear layer) trained end to end on the labeled images (optionally a
class-balanced subset, e.g. CIFAR-10 with 4,000 labels), then tested."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.features import image_batches
from fastssl.eval.ledger import NO_LEDGER


def balanced_subset(labels: np.ndarray, n: int, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per = n // num_classes
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crop and horizontal flip, on whole batches."""
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
    x = pad[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)


def finetune(backbone, source, prepare, labels_n, num_classes, epochs, lr, seeds, batch_size, device, log=print,
             ledger=NO_LEDGER):
    train, test = source.train, source.test
    y_all = np.asarray(train.labels)
    accs = []
    for seed in range(seeds):
        if ledger.has(seed):
            accs.append(ledger.get(seed))
            continue
        idx = balanced_subset(y_all, labels_n, num_classes, seed) if labels_n else np.arange(len(train))
        x = torch.cat(list(image_batches(train, source.image_size, prepare, 512, "cpu", idx)))
        y = torch.from_numpy(y_all[idx])
        net = copy.deepcopy(backbone).to(device)
        head = torch.nn.Linear(net.dim(), num_classes).to(device)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        steps = epochs * max(1, len(x) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        g = torch.Generator().manual_seed(seed)
        for ep in range(epochs):
            ledger.check()
            net.train()
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x) - batch_size + 1 if len(x) >= batch_size else 1, batch_size):
                b = perm[s:s + batch_size]
                xb = _augment(x[b], g).to(device)
                loss = F.cross_entropy(head(net.features(xb)), y[b].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in zip(image_batches(test, source.image_size, prepare, 512, device),
                              torch.from_numpy(np.asarray(test.labels)).split(512)):
                correct += (head(net.features(xb)).argmax(1).cpu() == yb).sum().item()
        accs.append(100.0 * correct / len(test))
        ledger.add(seed, accs[-1])
        log(f"  finetune seed {seed}: {accs[-1]:.2f}% ({len(idx)} labeled images, {epochs} epochs)")
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs,
            "labels": int(labels_n or len(y_all))}
