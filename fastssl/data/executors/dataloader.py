"""The baseline executor: the recipe's torch faces in ``torch.utils.data.DataLoader`` workers,
one whole batch per worker item (PIL decoding for folders)."""

from __future__ import annotations

import numpy as np
import torch

from fastssl.data.decode import load_image_region, split_images
from fastssl.data.executors.base import Executor, run_torch
from fastssl.data.ops.base import ViewContext
from fastssl.data.plan import ViewPlan, union_roi


class _BatchDataset(torch.utils.data.Dataset):
    """Item k = step k of the epoch plan, as a whole batch (workers build batches in parallel)."""

    def __init__(self, executor: "TorchExecutor", plan: ViewPlan):
        self.e, self.plan = executor, plan

    def __len__(self):
        return self.plan.steps - self.e.start_step

    def __getitem__(self, k):
        e = self.e
        s = self.plan.step(k + e.start_step)
        if e.whole:  # each file decoded, and only the region its views cover kept (as DALI's ROI decode)
            roi, s.fields["box"] = union_roi(s["box"])
            images = [load_image_region(e.split.files[i], r) for i, r in zip(s.sources, roi)]
        else:
            images = split_images(e.split, s.sources, e.base_size)
        views = run_torch(e.recipe, images, s, e.ctx)
        return {"views": views, "index": torch.from_numpy(s.index)}


def _worker_init(_):
    """Forked workers inherit the parent's objects, a DALI pipeline among them where one exists;
    collecting such an object in the child runs its destructor, which waits for threads that
    only exist in the parent (a hang).  The workers never need to free what they inherited."""
    import gc

    gc.freeze()


class TorchExecutor(Executor):
    """torchvision + ``DataLoader`` executor of the same plan: the baseline."""

    def __init__(
        self,
        split,
        recipe,
        batch_size,
        seed,
        rank,
        world,
        base_size,
        mean,
        std,
        num_workers=2,
        prefetch=2,
        pin_memory=False,
    ):
        super().__init__(split, recipe, batch_size, seed, rank, world, base_size=base_size)
        # imported here, once: every epoch forks new workers, which inherit it (1.4 s each otherwise)
        import torchvision.transforms.v2.functional  # noqa: F401

        self.ctx = ViewContext(recipe.size, tuple(mean), tuple(std))
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory

    def batch_dataset(self, plan):
        return _BatchDataset(self, plan)

    def __iter__(self):
        ds = self.batch_dataset(self.plan())
        kw = dict(prefetch_factor=self.prefetch, persistent_workers=False) if self.num_workers > 0 else {}
        # The DataLoader draws its workers' base seed when an iterator starts, from ``generator``
        # or else from torch's global RNG: an epoch's start (the uninterrupted run) and a resume
        # mid-epoch (the RNG restored from the checkpoint, then this draw) would then leave the
        # training step's random numbers (e.g. Exemplar-CNN's dropout) different.  Its own
        # generator leaves the global stream alone; the workers draw nothing (the plan holds it all).
        g = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, self.epoch, self.rank, 31]).integers(2**62))
        )
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init,
            generator=g,
            **kw,
        )
        yield from dl
