"""The GPU-resident executor: the whole in-memory dataset is one uint8 tensor on the training
device, and each step runs the recipe's torch faces there on the batch (one gather, batched
crops; no worker processes and no host-to-device copy of images per step), after airbench's
loader.  On a CPU it is the same code on CPU tensors.

Memory: the dataset's bytes on the device (STL-10's 105,000 unlabeled + train images at 96 px:
2.9 GB; CIFAR: 150 MB).  Only in-memory sources (builtin, CIFAR, STL-10); folders are files.
"""

from __future__ import annotations

import numpy as np
import torch

from fastssl.data.executors.base import Executor, run_torch
from fastssl.data.ops.base import ViewContext


def resident_images(split, device, chunk: int = 8192) -> torch.Tensor:
    """The split's (N, H, W, 3) uint8 images as one (N, 3, H, W) uint8 tensor on ``device``,
    copied in chunks (no second full copy on the host)."""
    n = len(split)
    first = np.asarray(split.images[0])
    out = torch.empty((n, 3, *first.shape[:2]), dtype=torch.uint8, device=device)
    for s in range(0, n, chunk):
        part = np.ascontiguousarray(split.images[s : min(n, s + chunk)])
        out[s : s + len(part)] = torch.from_numpy(part).to(device).permute(0, 3, 1, 2)
    return out


class TensorExecutor(Executor):
    """The plan executed with batched torch ops on the dataset resident on ``device``."""

    def __init__(self, split, recipe, batch_size, seed, rank, world, mean, std, device="cpu"):
        if split.encoded:
            raise ValueError(
                "data.pipeline=tensor: a folder's images are files; the tensor executor needs an "
                "in-memory source (builtin, stl10, cifar10, cifar100)"
            )
        super().__init__(split, recipe, batch_size, seed, rank, world)
        self.device = torch.device(device)
        self.images = resident_images(split, self.device)
        self.ctx = ViewContext(recipe.size, tuple(mean), tuple(std))

    def __iter__(self):
        plan = self.plan()
        for k in range(self.start_step, plan.steps):
            s = plan.step(k)
            index = torch.from_numpy(s.index)
            x = self.images[torch.from_numpy(s.sources).to(self.device, non_blocking=True)]
            yield {"views": run_torch(self.recipe, x, s, self.ctx), "index": index}
