"""Backbone features of whole images (no crop): the frozen-feature protocols of fastssl/eval/,
the online kNN monitor (fastssl/engine/monitors.py) and the report read them."""

from __future__ import annotations

import time

import numpy as np
import torch

from fastssl.data.decode import split_images
from fastssl.data.sources import Split


def image_batches(split: Split, size: int, prepare, batch_size: int, device, index=None):
    """Network-input batches of the split's whole images (optionally a subset ``index``);
    ``prepare`` maps a (B, 3, H, W) uint8 batch to the input (``Method.eval_input``)."""
    idx = np.arange(len(split)) if index is None else np.asarray(index)
    for start in range(0, len(idx), batch_size):
        yield prepare(split_images(split, idx[start : start + batch_size], size).to(device))


@torch.no_grad()
def extract_with(fn, backbone, split: Split, source, prepare, batch_size: int, device, index=None) -> torch.Tensor:
    """``fn(backbone, x)`` of every batch of the split's whole images (or of the subset ``index``),
    the backbone in eval mode, concatenated on the CPU: the one loop every feature extractor runs."""
    backbone.eval()
    batches = image_batches(split, source.image_size, prepare, batch_size, device, index)
    return torch.cat([fn(backbone, x).cpu() for x in batches])


def extract(backbone, split: Split, source, prepare, batch_size: int, device, stage=None, index=None) -> torch.Tensor:
    """The backbone's pooled features at ``stage`` (None: its last)."""
    return extract_with(lambda b, x: b.features(x, stage), backbone, split, source, prepare, batch_size, device, index)


def labeled_features(cfg, source, backbone, prepare, device, log=print):
    """(train features, train labels, test features, test labels) at stage ``eval.layer``."""
    t = time.time()
    e = cfg.eval
    xtr = extract(backbone, source.train, source, prepare, e.batch_size, device, e.layer)
    xte = extract(backbone, source.test, source, prepare, e.batch_size, device, e.layer)
    ytr, yte = torch.from_numpy(np.asarray(source.train.labels)), torch.from_numpy(np.asarray(source.test.labels))
    log(f"  features: {tuple(xtr.shape)} train, {tuple(xte.shape)} test ({time.time() - t:.1f}s)")
    return xtr, ytr, xte, yte
