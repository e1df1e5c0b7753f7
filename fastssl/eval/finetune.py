"""Fine-tune protocol of the SC paper: the pre-trained backbone initialises a supervised
classifier (backbone + linear layer) trained end to end on the labeled images (optionally a
class-balanced subset, e.g. CIFAR-10 with 4,000 labels), then tested."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.harness import percent_correct, repeat_runs, train_supervised
from fastssl.eval.ledger import NO_LEDGER
from fastssl.features.images import image_batches

if TYPE_CHECKING:
    from fastssl.config import EvalConfig


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
    x = pad[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)


class Classifier(torch.nn.Module):
    """Backbone features -> linear layer."""

    def __init__(self, backbone, num_classes: int, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        # torch's default init, drawn from the run's own seed (the global RNG left as it was): a run
        # resumed from the ledger starts from the same head as in an uninterrupted evaluation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(backbone.dim(), num_classes)

    def forward(self, x):
        return self.head(self.backbone.features(x))


def finetune(backbone, source, prepare, settings: EvalConfig, *, device, log=print, ledger=NO_LEDGER):
    """``settings.finetune_seeds`` runs (seeds 0, 1, ...) of ``settings.finetune_epochs`` epochs on
    ``settings.finetune_labels`` class-balanced labeled images (None: all), SGD at
    ``settings.finetune_lr``, batches of ``settings.batch_size`` (at most 128); ``settings``: the
    ``eval`` node."""
    labels_n, num_classes = settings.finetune_labels, source.num_classes
    epochs, lr, batch_size = settings.finetune_epochs, settings.finetune_lr, min(settings.batch_size, 128)
    train, test = source.train, source.test
    y_all = np.asarray(train.labels)

    def subset(seed):
        return balanced_subset(y_all, labels_n, num_classes, seed) if labels_n else np.arange(len(train))

    def run(seed):
        idx = subset(seed)
        x = torch.cat(list(image_batches(train, source.image_size, prepare, 512, "cpu", idx)))
        y = torch.from_numpy(y_all[idx])
        net = Classifier(copy.deepcopy(backbone), num_classes, seed).to(device)
        train_supervised(
            net,
            x,
            y,
            epochs,
            batch_size,
            device,
            drop_last=True,
            augment=_augment,
            make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
            schedule=torch.optim.lr_scheduler.CosineAnnealingLR,
            generator=torch.Generator().manual_seed(seed),
            ledger=ledger,
        )  # seeded: batches and augmentation
        batches = zip(
            image_batches(test, source.image_size, prepare, 512, device),
            torch.from_numpy(np.asarray(test.labels)).split(512),
        )
        return percent_correct(net, batches, len(test))

    def message(seed, acc):
        return f"  finetune seed {seed}: {acc:.2f}% ({len(subset(seed))} labeled images, {epochs} epochs)"

    return repeat_runs(settings.finetune_seeds, run, ledger, log, message, labels=int(labels_n or len(y_all)))
