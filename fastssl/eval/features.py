"""Backbone features of whole images (no crop), for the frozen-feature protocols."""
from __future__ import annotations

import numpy as np
import torch

from fastssl.data.pipeline import load_image_file
from fastssl.data.sources import Split


def image_batches(split: Split, size: int, mean, std, batch_size: int, device, index=None):
    """Normalised float CHW batches of the split's images (optionally a subset ``index``)."""
    idx = np.arange(len(split)) if index is None else np.asarray(index)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        if split.encoded:
            x = torch.stack([load_image_file(split.files[i], size) for i in sel])
        else:
            x = torch.from_numpy(np.stack([np.asarray(split.images[int(i)]) for i in sel])).permute(0, 3, 1, 2)
        yield (x.to(device).float() / 255.0 - m) / s


@torch.no_grad()
def extract(backbone, split: Split, source, batch_size: int, device, stage=None) -> torch.Tensor:
    backbone.eval()
    feats = [backbone.features(x, stage).cpu() for x in
             image_batches(split, source.image_size, source.mean, source.std, batch_size, device)]
    return torch.cat(feats)
