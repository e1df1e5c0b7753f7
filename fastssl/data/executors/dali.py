"""The DALI executor: one graph for ``device='gpu'`` or ``device='cpu'`` (``device_id=None``).

Images (or encoded JPEG/PNG bytes) and the plan enter through ``fn.external_source``: the
images, the indices, then for each view each field the recipe's ops read (``Recipe.reads``);
each op's DALI face adds its operators; DALI's PyTorch iterator hands the batches to torch.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np

from fastssl.data.executors.base import Executor
from fastssl.data.ops.base import ViewContext
from fastssl.data.ops.colour import fuse_flip
from fastssl.data.plan import ViewPlan
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split


class _PlanSource:
    """Iterable for ``fn.external_source``: one epoch of an executor's plan, batch by batch
    (``executor.epoch_plan(epoch)`` and ``executor.step_inputs(plan, k)`` say what goes in).

    DALI calls ``iter()`` on the source when it builds the graph, again before the first
    batch, and by itself after an epoch ends (it may prefetch from the next one before the
    training loop asks for it).  So the source owns the schedule: until an epoch has been
    served to its end it starts at ``(executor.epoch, executor.start_step)``; after that, every
    new pass is the next epoch from step 0.
    """

    def __init__(self, executor: "DaliExecutor"):
        self.executor = executor
        self.finished = None  # last epoch served to its end

    def __iter__(self):
        e = self.executor
        if self.finished is None:
            self.epoch, self.k = e.epoch, e.start_step
        else:
            self.epoch, self.k = self.finished + 1, 0
        self.plan = e.epoch_plan(self.epoch)
        return self

    def __next__(self):
        if self.k >= self.plan.steps:
            self.finished = self.epoch
            raise StopIteration
        self.k += 1
        return self.executor.step_inputs(self.plan, self.k - 1)


def dali_images(split: Split, idx) -> List[np.ndarray]:
    """What an external source feeds DALI for images ``idx``: encoded file bytes (decoded in the
    graph) or contiguous HWC uint8 arrays."""
    if split.encoded:
        return [np.fromfile(split.files[i], dtype=np.uint8) for i in idx]
    return [np.ascontiguousarray(split.images[i]) for i in idx]


def dali_decode(encoded, device: str, base_size: int):
    """Encoded JPEG/PNG bytes -> RGB, shorter side resized to ``base_size``, centre square."""
    from nvidia.dali import fn, types

    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=base_size, antialias=True)
    return fn.crop(images, crop=(base_size, base_size))


def feed(a: np.ndarray) -> list:
    """One field of one view, (B, ...), as external-source samples (flags as int32, DALI's type
    for flag arguments)."""
    if a.dtype in (np.uint8, np.bool_):
        a = a.astype(np.int32)
    return list(np.ascontiguousarray(a))


def build_dali_pipeline(source, recipe: Recipe, device: str, batch_size: int, num_threads: int,
                        device_id: Optional[int], base_size: int, encoded: bool, mean, std,
                        prefetch: int = 2, seed: int = 0):
    """The recipe's graph for device 'gpu' or 'cpu' (same graph): outputs each view's outputs,
    then the index."""
    from nvidia.dali import fn, pipeline_def

    reads, ctx = recipe.reads, ViewContext(recipe.size, tuple(mean), tuple(std), device)
    ops = fuse_flip(recipe.ops)  # the flip done by crop_mirror_normalize where it can be

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=seed)
    def views_of_plan():
        outs = fn.external_source(source=source, num_outputs=2 + len(reads) * recipe.views, batch=True, cycle="raise")
        images, index = outs[0], outs[1]
        if encoded:
            images = dali_decode(images, device, base_size)
        elif device == "gpu":
            images = images.gpu()
        views = []
        for v in range(recipe.views):
            f = dict(zip(reads, outs[2 + len(reads) * v: 2 + len(reads) * (v + 1)]))
            x = images
            for op in ops:
                x = op.dali(x, f, ctx)
            views.extend(x if isinstance(x, (list, tuple)) else [x])
        return (*views, index)

    return views_of_plan()


class DaliExecutor(Executor):
    """DALI pipeline + ``DALIGenericIterator``, one pipeline per process (sharded by rank)."""

    def __init__(self, split, recipe, batch_size, seed, rank, world, device, base_size, mean, std,
                 num_threads=2, prefetch=2, device_id=None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        super().__init__(split, recipe, batch_size, seed, rank, world)
        self.names = [f"view{v}" for v in range(recipe.views * recipe.outputs_per_view)] + ["index"]
        # the op that prepares each field for the graph (Op.feed): the first op reading it
        self.feeders = {name: next(op for op in recipe.ops if name in op.reads) for name in recipe.reads}
        self.source, self._it = _PlanSource(self), None
        # the pipeline is built on first use, after set_epoch
        self._make_iter = lambda: DALIGenericIterator([build_dali_pipeline(
            self.source, recipe, device, batch_size, max(1, num_threads), device_id if device == "gpu" else None,
            base_size, split.encoded, mean, std, prefetch, seed)], self.names, auto_reset=False)

    def step_inputs(self, plan: ViewPlan, k: int):
        """The external source's inputs of step k: images, index, and each view's fields."""
        s = plan.step(k)
        out = [dali_images(self.split, s.sources), list(s.index.reshape(-1, 1))]
        for v in range(self.recipe.views):
            out += [feed(self.feeders[name].feed(name, s[name][:, v])) for name in self.recipe.reads]
        return out

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if self._it is not None and (epoch, start_step) != (self.epoch + 1, 0):
            raise ValueError(f"the DALI loader runs whole epochs in order: next is {self.epoch + 1}, not {epoch} from step {start_step}")
        super().set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[Dict]:
        if self._it is None:
            self._it = self._make_iter()  # builds the pipeline; starts at (epoch, start_step)
        else:
            self._it.reset()  # the source has already moved on to the next epoch
        for out in self._it:
            d = out[0]
            yield {"views": [d[n] for n in self.names[:-1]], "index": d["index"].view(-1).long()}
