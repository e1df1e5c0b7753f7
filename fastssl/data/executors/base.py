"""What every executor shares: the epoch schedule (``set_epoch(e, start_step)``, then iterate),
crops over whole images of folders, and running a recipe's torch faces on a batch (the torch and
tensor executors).

Folders (files of any size, each image's size recorded by the data check): a recipe that starts
with ``Crop`` draws its boxes over each image's whole frame (the image scaled so its shorter side
is ``data.image_size``; ``plan.frame_shapes``), the boxes are turned into the image's own pixels
(``plan.to_image_boxes``) on the host, each image is decoded only over the region its views cover
(``plan.union_roi``: DALI's ROI decoder, PIL's crop for the baseline) and every view is resized
to the view size (``over_whole_images``)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import torch

from fastssl.data.ops.base import ViewContext
from fastssl.data.ops.geometry import Crop, Resize
from fastssl.data.plan import ViewPlan, check_fields, frame_shapes, make_epoch_plan, steps_per_epoch, to_image_boxes
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split


def whole_image(split: Optional[Split], recipe: Optional[Recipe]) -> bool:
    """Whether ``recipe`` crops whole images of ``split`` (files of known sizes, boxes planned
    per image) rather than the square every in-memory image is."""
    return (
        split is not None
        and recipe is not None
        and split.encoded
        and split.sizes is not None
        and recipe.plan is None
        and bool(recipe.ops)
        and isinstance(recipe.ops[0], Crop)
    )


def over_whole_images(recipe: Recipe) -> Recipe:
    """The recipe for whole images: crop the planned box of the (region-decoded) image, then resize
    it to the view size (a recipe that only crops gets the resize; it plans boxes of that size)."""
    ops = [Crop(), Resize()] + [op for op in recipe.ops[1:] if not isinstance(op, Resize)]
    return dataclasses.replace(recipe, ops=ops)


class Executor:
    """Runs a recipe's plan over a split, one rank's shard, whole epochs.  Iterating yields
    ``{"views": [tensor per view output], "index": (B,) int64 image indices}``."""

    def __init__(
        self,
        split: Optional[Split],
        recipe: Optional[Recipe],
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        items: Optional[int] = None,
        base_size: Optional[int] = None,
    ):
        """``items``: samples per epoch when they are not the split's images (e.g. surrogate patches);
        ``base_size``: the shorter side a folder's images are seen at (``data.image_size``)."""
        self.whole = whole_image(split, recipe) and base_size is not None
        self.planned_recipe = recipe  # the recipe whose draw plans the boxes
        if self.whole:
            self.frames = frame_shapes(split.sizes, base_size)
            recipe = over_whole_images(recipe)
        self.split, self.recipe, self.base_size = split, recipe, base_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.start_step = 0, 0
        items = items if items is not None else (recipe.items if recipe is not None else None)
        n = len(split) if items is None else items
        self.steps_per_epoch = steps_per_epoch(n, batch_size, world)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{n} {'images' if items is None else 'samples'} are fewer than one global batch of "
                f"{batch_size} x {world}"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_plan(self, epoch: int) -> ViewPlan:
        r = self.recipe
        if r.plan is not None:  # the recipe's own plan (e.g. Exemplar-CNN's, drawn per step)
            return r.plan(self.seed, epoch, self.rank, self.world, self.batch_size)
        plan = make_epoch_plan(
            len(self.split),
            self.batch_size,
            r.draw,
            self.seed,
            epoch,
            self.rank,
            self.world,
            self.frames if self.whole else None,
        )
        check_fields(plan.fields, len(plan.index), r.views, r.reads, r.name)
        if self.whole:
            if not self.planned_recipe.has(Resize) and (plan["box"][..., 2:] != r.size).any():
                raise ValueError(f"{r.name}: a recipe without Resize must plan boxes of its view size {r.size}")
            plan.fields["box"] = to_image_boxes(plan["box"], self.split.sizes[plan.sources], self.base_size)
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
