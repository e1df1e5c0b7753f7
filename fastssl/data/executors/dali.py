"""The DALI executor: one graph for ``device='gpu'`` or ``device='cpu'`` (``device_id=None``).

Images (or encoded JPEG/PNG bytes) and the plan enter through ``fn.external_source``: the
images, the indices, then for each view each field the recipe's ops read (``Recipe.reads``);
each op's DALI face adds its operators; DALI's PyTorch iterator hands the batches to torch.

Folders: the files' bytes come from a second, parallel external source (``FileReader``, run by
``data.reader_workers`` worker processes that follow the same epoch order), so the training
process's main thread only hands DALI the plan's small arrays; each image is decoded over the
region its views cover (``fn.decoders.image_slice``: ROI decoding, on the GPU with the
hardware/hybrid decoder for ``dali-gpu``, ``data.hw_decoder_load`` of the work on the hardware
JPEG decoder where the GPU has one).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np

from fastssl.data.executors.base import Executor
from fastssl.data.ops.base import ViewContext
from fastssl.data.ops.colour import fuse_flip
from fastssl.data.plan import ViewPlan, epoch_order, union_roi
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


class FileReader:
    """Sample callback of a parallel ``fn.external_source``: the encoded bytes of sample j of step
    k, in the order of the executor's plan (``plan.epoch_order``: the shuffle, no view drawn), run
    in DALI's worker processes.  DALI counts its passes from 0; the first pass is ``epoch`` from
    ``start_step``, each later one the next epoch from step 0 (as ``_PlanSource``).  Picklable
    (plain data) for the ``spawn`` start method."""

    def __init__(
        self, files: List[str], batch_size: int, seed: int, rank: int, world: int, epoch: int, start_step: int
    ):
        self.files, self.batch_size, self.seed, self.rank, self.world = files, batch_size, seed, rank, world
        self.epoch, self.start_step = epoch, start_step
        self._epoch, self._take = None, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._take = epoch_order(len(self.files), self.batch_size, self.seed, epoch, self.rank, self.world)[1]
        return self._take

    def __call__(self, info) -> np.ndarray:
        epoch = self.epoch + info.epoch_idx
        k = info.iteration + (self.start_step if info.epoch_idx == 0 else 0)
        take = self.order(epoch)
        i = k * self.batch_size + info.idx_in_batch
        if i >= len(take):
            raise StopIteration
        return np.fromfile(self.files[take[i]], dtype=np.uint8)


def reads_in_workers(split: Split, recipe: Recipe, reader_workers: int) -> bool:
    """Whether worker processes read the files: a folder whose recipe follows the epoch plan
    (not a recipe with its own plan, e.g. Exemplar-CNN's)."""
    return split.encoded and reader_workers > 0 and recipe.plan is None


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


def dali_decode_region(encoded, roi_anchor, roi_shape, device: str, hw_decoder_load: float = 0.65):
    """Encoded JPEG/PNG bytes -> RGB of the region (y, x) + (h, w) only (ROI decoding), the
    stored pixels as PIL reads them (no EXIF rotation)."""
    from nvidia.dali import fn, types

    kw = dict(hw_decoder_load=hw_decoder_load) if device == "gpu" else {}
    return fn.decoders.image_slice(
        encoded,
        roi_anchor,
        roi_shape,
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,
        **kw,
    )


def feed(a: np.ndarray) -> list:
    """One field of one view, (B, ...), as external-source samples (flags as int32, DALI's type
    for flag arguments)."""
    if a.dtype in (np.uint8, np.bool_):
        a = a.astype(np.int32)
    return list(np.ascontiguousarray(a))


def reader_start_method() -> str:
    """How DALI starts its reader processes: ``fork`` (fast) unless this process has initialised
    CUDA, which a forked child cannot use (then ``spawn``; the reader is picklable)."""
    import torch

    return "spawn" if torch.cuda.is_initialized() else "fork"


def build_dali_pipeline(
    source,
    recipe: Recipe,
    device: str,
    batch_size: int,
    num_threads: int,
    device_id: Optional[int],
    base_size: int,
    encoded: bool,
    mean,
    std,
    prefetch: int = 2,
    seed: int = 0,
    whole: bool = False,
    reader=None,
    reader_workers: int = 0,
    hw_decoder_load: float = 0.65,
):
    """The recipe's graph for device 'gpu' or 'cpu' (same graph): outputs each view's outputs,
    then the index.  ``whole``: folder files decoded over each image's region of interest (the
    main source then feeds the region before the fields); ``reader``: a FileReader feeding the
    files' bytes from ``reader_workers`` processes (None: the main source feeds them)."""
    from nvidia.dali import fn, pipeline_def, types

    reads, ctx = recipe.reads, ViewContext(recipe.size, tuple(mean), tuple(std), device)
    ops = fuse_flip(recipe.ops)  # the flip done by crop_mirror_normalize where it can be
    lead = (reader is None) + 1 + 2 * whole  # [images], index, [roi anchor, roi shape]
    workers = dict(py_num_workers=reader_workers, py_start_method=reader_start_method()) if reader is not None else {}

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
        **workers,
    )
    def views_of_plan():
        outs = fn.external_source(
            source=source, num_outputs=lead + len(reads) * recipe.views, batch=True, cycle="raise"
        )
        if reader is not None:  # the files' bytes, read in worker processes
            images = fn.external_source(
                source=reader, batch=False, parallel=True, dtype=types.UINT8, ndim=1, prefetch_queue_depth=prefetch
            )
            outs = [images, *outs]
        images, index = outs[0], outs[1]
        if whole:
            images = dali_decode_region(images, outs[2], outs[3], device, hw_decoder_load)
        elif encoded:
            images = dali_decode(images, device, base_size)
        elif device == "gpu":
            images = images.gpu()
        views = []
        first = 2 + 2 * whole
        for v in range(recipe.views):
            f = dict(zip(reads, outs[first + len(reads) * v : first + len(reads) * (v + 1)]))
            x = images
            for op in ops:
                x = op.dali(x, f, ctx)
            views.extend(x if isinstance(x, (list, tuple)) else [x])
        return (*views, index)

    return views_of_plan()


class DaliExecutor(Executor):
    """DALI pipeline + ``DALIGenericIterator``, one pipeline per process (sharded by rank)."""

    def __init__(
        self,
        split,
        recipe,
        batch_size,
        seed,
        rank,
        world,
        device,
        base_size,
        mean,
        std,
        num_threads=2,
        prefetch=2,
        device_id=None,
        reader_workers=0,
        hw_decoder_load=0.65,
    ):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        super().__init__(split, recipe, batch_size, seed, rank, world, base_size=base_size)
        recipe = self.recipe  # (for whole images: crop then resize)
        self.names = [f"view{v}" for v in range(recipe.views * recipe.outputs_per_view)] + ["index"]
        # the op that prepares each field for the graph (Op.feed): the first op reading it
        self.feeders = {name: next(op for op in recipe.ops if name in op.reads) for name in recipe.reads}
        self.source, self._it = _PlanSource(self), None
        self.parallel = reads_in_workers(split, recipe, reader_workers)

        def make_iter():  # the pipeline is built on first use, after set_epoch
            reader = (
                FileReader(split.files, batch_size, seed, rank, world, self.epoch, self.start_step)
                if self.parallel
                else None
            )
            pipe = build_dali_pipeline(
                self.source,
                recipe,
                device,
                batch_size,
                max(1, num_threads),
                device_id if device == "gpu" else None,
                base_size,
                split.encoded,
                mean,
                std,
                prefetch,
                seed,
                whole=self.whole,
                reader=reader,
                reader_workers=reader_workers,
                hw_decoder_load=hw_decoder_load,
            )
            return DALIGenericIterator([pipe], self.names, auto_reset=False)

        self._make_iter = make_iter

    def step_inputs(self, plan: ViewPlan, k: int):
        """The main external source's inputs of step k: the images (unless worker processes read
        them), the index, the region to decode (whole images), and each view's fields."""
        s = plan.step(k)
        out = [] if self.parallel else [dali_images(self.split, s.sources)]
        out.append(list(s.index.reshape(-1, 1)))
        if self.whole:
            roi, s.fields["box"] = union_roi(s["box"])
            out += [list(np.ascontiguousarray(roi[:, :2])), list(np.ascontiguousarray(roi[:, 2:]))]
        for v in range(self.recipe.views):
            out += [feed(self.feeders[name].feed(name, s[name][:, v])) for name in self.recipe.reads]
        return out

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if self._it is not None and (epoch, start_step) != (self.epoch + 1, 0):
            raise ValueError(
                f"the DALI loader runs whole epochs in order: next is {self.epoch + 1}, not {epoch} from step {start_step}"
            )
        super().set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[Dict]:
        if self._it is None:
            self._it = self._make_iter()  # builds the pipeline; starts at (epoch, start_step)
        else:
            self._it.reset()  # the source has already moved on to the next epoch
        for out in self._it:
            d = out[0]
            yield {"views": [d[n] for n in self.names[:-1]], "index": d["index"].view(-1).long()}
