"""What every executor shares: the epoch schedule (``set_epoch(e, start_step)``, then iterate)
and running a recipe's torch faces on a batch (the torch and tensor executors)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from fastssl.data.ops.base import ViewContext
from fastssl.data.plan import ViewPlan, check_fields, make_epoch_plan, steps_per_epoch
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split


class Executor:
    """Runs a recipe's plan over a split, one rank's shard, whole epochs.  Iterating yields
    ``{"views": [tensor per view output], "index": (B,) int64 image indices}``."""

    def __init__(self, split: Optional[Split], recipe: Optional[Recipe], batch_size: int, seed: int, rank: int,
                 world: int, items: Optional[int] = None):
        """``items``: samples per epoch when they are not the split's images (e.g. surrogate patches)."""
        self.split, self.recipe = split, recipe
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.start_step = 0, 0
        items = items if items is not None else (recipe.items if recipe is not None else None)
        n = len(split) if items is None else items
        self.steps_per_epoch = steps_per_epoch(n, batch_size, world)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} {'images' if items is None else 'samples'} are fewer than one global batch of "
                             f"{batch_size} x {world}")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_plan(self, epoch: int) -> ViewPlan:
        r = self.recipe
        if r.plan is not None:  # the recipe's own plan (e.g. Exemplar-CNN's, drawn per step)
            return r.plan(self.seed, epoch, self.rank, self.world, self.batch_size)
        plan = make_epoch_plan(len(self.split), self.batch_size, r.draw, self.seed, epoch, self.rank, self.world)
        check_fields(plan.fields, len(plan.index), r.views, r.reads, r.name)
        return plan

    def plan(self) -> ViewPlan:
        return self.epoch_plan(self.epoch)


def view_fields(step: ViewPlan, names, v: int):
    """The fields ``names`` of view ``v`` of a step, as CPU tensors (B, ...)."""
    return {n: torch.from_numpy(np.ascontiguousarray(step[n][:, v])) for n in names}


def run_torch(recipe: Recipe, images: torch.Tensor, step: ViewPlan, ctx: ViewContext) -> List[torch.Tensor]:
    """Every view of a step through the recipe's torch faces: (B, 3, H, W) uint8 images (on any
    device) -> the outputs of view 0, then view 1, ..."""
    out: List[torch.Tensor] = []
    for v in range(recipe.views):
        f = view_fields(step, recipe.reads, v)
        x = images
        for op in recipe.ops:
            x = op.torch(x, f, ctx)
        out.extend(x if isinstance(x, (list, tuple)) else [x])
    return out
