"""Transfer protocol of the layer-wise contrastive paper: the learned first layer, frozen or
fine-tuned, inside a small classifier (that layer + one more conv + 2 fully connected layers)
trained with labels; Adam, lr 1e-3 for the first two thirds of training and 1e-4 after; mean
+- std over several runs (the transferred filters stay the same across runs).

``classifier="authors"``: the classifier of Zhao et al.'s code instead (github.com/Silent-Zebra/
shallow-conv, networks.py ClassifierCNN as Experiments_CIFAR10_FrozenConv.py builds it): the
transferred conv, 2x2 max-pool, BatchNorm, ReLU; a 3x3 conv of 512 filters (no padding), 2x2
max-pool, BatchNorm, ReLU; fc 512, ReLU, BatchNorm1d, fc to the classes and a softmax (their
network ends in Softmax and is trained with CrossEntropyLoss on it: kept); 4-px zero-padded random
crops and horizontal flips of the training images; lr 1e-3, x0.1 from epoch ``epochs // 1.5``
(their StepLR stepped after each epoch), Adam, no weight decay."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from fastssl.errors import choice
from fastssl.eval.finetune import balanced_subset
from fastssl.eval.harness import percent_correct, repeat_runs, train_supervised
from fastssl.eval.ledger import NO_LEDGER
from fastssl.features.images import image_batches

if TYPE_CHECKING:
    from fastssl.config import EvalConfig


class SmallClassifier(nn.Module):
    def __init__(self, first: nn.Module, first_channels: int, image_size: int, num_classes: int, width: int = 64):
        super().__init__()
        self.first = first  # conv + ReLU + max-pool, transferred
        self.conv2 = nn.Sequential(
            nn.Conv2d(first_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )
        with torch.no_grad():
            n = self.conv2(self.first(torch.zeros(1, 3, image_size, image_size))).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.fc(self.conv2(self.first(x)))


class AuthorsClassifier(nn.Module):
    """The authors' ClassifierCNN around the transferred conv (``first``: the conv alone)."""

    def __init__(
        self,
        first: nn.Conv2d,
        first_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 512,
        hidden: int = 512,
    ):
        super().__init__()
        self.first = first
        self.convnet = nn.Sequential(
            nn.MaxPool2d(2),
            nn.BatchNorm2d(first_channels),
            nn.ReLU(),
            nn.Conv2d(first_channels, width, 3),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        with torch.no_grad():
            n = self.convnet(self.first(torch.zeros(2, 3, image_size, image_size))).numel() // 2
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes),
            nn.Softmax(dim=1),
        )

    def forward(self, x):
        return self.fc(self.convnet(self.first(x)))


def crop_flip(pad_value: torch.Tensor, pad: int = 4):
    """The authors' RandomCrop(size, padding=4) + RandomHorizontalFlip, per image: ``pad_value``
    (1, C, 1, 1) is a black pixel in the network's input space (zero padding before ToTensor)."""

    def augment(x: torch.Tensor, g) -> torch.Tensor:
        n, c, h, w = x.shape
        big = pad_value.to(x.dtype).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
        big[:, :, pad : pad + h, pad : pad + w] = x
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, c, h, w + 2 * pad)
        x = big.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, c, h, w)
        x = x.gather(3, cols)
        flip = torch.rand(n, generator=g) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    return augment


CLASSIFIERS = ("small", "authors")


def transfer(backbone, source, prepare, settings: EvalConfig, *, device, log=print, ledger=NO_LEDGER):
    """``settings.transfer_runs`` runs of ``settings.transfer_epochs`` epochs of the
    ``settings.transfer_classifier`` around the backbone's first layer (frozen when
    ``settings.transfer_freeze``), on ``settings.finetune_labels`` class-balanced labeled images
    (None: all), batches of ``settings.batch_size`` (at most 128); ``settings``: the ``eval`` node."""
    classifier, freeze = settings.transfer_classifier, settings.transfer_freeze
    epochs, batch_size = settings.transfer_epochs, min(settings.batch_size, 128)
    labels_n, num_classes = settings.finetune_labels, source.num_classes
    choice(classifier, "eval.transfer_classifier", CLASSIFIERS)
    y_all = np.asarray(source.train.labels)
    idx = balanced_subset(y_all, labels_n, num_classes, 0) if labels_n else np.arange(len(y_all))
    x = torch.cat(list(image_batches(source.train, source.image_size, prepare, 512, "cpu", idx)))
    y = torch.from_numpy(y_all[idx])
    xt = torch.cat(list(image_batches(source.test, source.image_size, prepare, 512, "cpu")))
    yt = torch.from_numpy(np.asarray(source.test.labels))
    first, width = backbone.stages["layer1"], backbone.dim("layer1")
    if classifier == "authors":  # shallow-conv's: its conv2/fc on the bare conv, crop/flip, lr x0.1 after epochs // 1.5
        black = prepare(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).float().cpu()
        train_kw = dict(augment=crop_flip(black), drop_last=len(x) % batch_size == 1)  # (drop_last: BatchNorm1d)
        switch, what, extra = int(epochs // 1.5), "authors' classifier, ", {"classifier": "authors"}

        def build():
            return AuthorsClassifier(copy.deepcopy(first[0]), width, source.image_size, num_classes)
    else:
        train_kw, switch, what, extra = {}, int(round(2 * epochs / 3)), "", {}

        def build():
            return SmallClassifier(copy.deepcopy(first), width, source.image_size, num_classes)

    def run(k):
        torch.manual_seed(
            1000 + k
        )  # the new layers' init, the batch order and augmentation (global RNG) differ per run
        net = build().to(device)
        for p in net.first.parameters():
            p.requires_grad_(not freeze)
        train_supervised(
            net,
            x,
            y,
            epochs,
            batch_size,
            device,
            make_opt=lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3),
            epoch_lr=lambda ep: 1e-3 if ep < switch else 1e-4,
            ledger=ledger,
            **train_kw,
        )
        return percent_correct(net, ((xb.to(device), yb) for xb, yb in zip(xt.split(512), yt.split(512))), len(xt))

    def message(k, acc):
        frozen = "frozen" if freeze else "fine-tuned"
        return f"  transfer run {k}: {acc:.2f}% ({what}{frozen} first layer, {epochs} epochs)"

    return repeat_runs(settings.transfer_runs, run, ledger, log, message, frozen=freeze, labels=int(len(idx)), **extra)
