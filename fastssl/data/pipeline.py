"""Data pipelines: one crop plan, three executors (DALI on the GPU, DALI on the CPU, torchvision).

A method's *pipeline recipe* is its ``crop_plan``: for every image of an epoch, the boxes
(y, x, h, w) of its views and whether each is flipped.  The plan is drawn on the host from
``(seed, epoch)`` only, so

* every executor cuts exactly the same pixels (tests compare DALI CPU with torchvision),
* a run resumed mid-epoch re-creates the epoch's plan and skips the steps already done, and
* DDP ranks agree on the permutation and take disjoint shards of it.

The DALI pipeline is written once and built for ``device='gpu'`` or ``device='cpu'``
(``device_id=None``): images (or encoded JPEG/PNG bytes) and the plan enter through
``fn.external_source``; ``fn.decoders.image``, ``fn.slice``, ``fn.resize`` and
``fn.crop_mirror_normalize`` do the work; DALI's PyTorch iterator hands the batches to torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from fastssl.data.sources import Split

PlanFn = Callable[[np.random.Generator, int], Tuple[np.ndarray, np.ndarray, np.ndarray]]

# RGB <-> YIQ, the colour space of DALI's fn.hsv (hue rotates I/Q, saturation scales them)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_INV = np.linalg.inv(_YIQ)


@dataclass
class ColorJitter:
    """Per-view colour change drawn in the plan (defaults: none).  Applied as DALI's ``fn.hsv``."""

    hue: float = 0.0  # rotation drawn uniformly in [-hue, hue] degrees
    saturation: List[float] = field(default_factory=lambda: [1.0, 1.0])  # multiplier range (0 = grey)
    value: List[float] = field(default_factory=lambda: [1.0, 1.0])  # brightness multiplier range

    @property
    def active(self) -> bool:
        return color_active(self)


def color_active(jitter) -> bool:
    """Whether a ColorJitter (dataclass or config node) changes anything."""
    return jitter.hue != 0 or list(jitter.saturation) != [1.0, 1.0] or list(jitter.value) != [1.0, 1.0]


def check_color(jitter, key: str = "method.color") -> None:
    """Refuse impossible colour-change settings, naming the key (ConfigError)."""
    from fastssl.config import ConfigError

    if not 0 <= jitter.hue <= 180:
        raise ConfigError(f"{key}.hue: must be in [0, 180] degrees, got {jitter.hue}")
    for k in ("saturation", "value"):
        r = list(getattr(jitter, k))
        if len(r) != 2 or not 0 <= r[0] <= r[1]:
            raise ConfigError(f"{key}.{k}: must be a range [lo, hi] with 0 <= lo <= hi, got {r}")


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Whole global batches per epoch (the last partial batch is dropped on every rank)."""
    return n // (batch_size * world)


def draw_color(rng: np.random.Generator, n: int, views: int, jitter) -> np.ndarray:
    """(n, views, 3) float32: hue degrees, saturation and value multipliers."""
    out = np.empty((n, views, 3), np.float32)
    out[..., 0] = rng.uniform(-jitter.hue, jitter.hue, (n, views)) if jitter.hue else 0.0
    out[..., 1] = rng.uniform(*jitter.saturation, (n, views))
    out[..., 2] = rng.uniform(*jitter.value, (n, views))
    return out


def square_crops(rng: np.random.Generator, n: int, views: int, side: int, image_size: int, flip: bool):
    """Boxes (n, views, 4) of side x side squares at uniform random positions, and flips (n, views)."""
    yx = rng.integers(0, image_size - side + 1, size=(n, views, 2), dtype=np.int32)
    boxes = np.concatenate([yx, np.full((n, views, 2), side, np.int32)], axis=2)
    flips = rng.integers(0, 2, size=(n, views), dtype=np.uint8) if flip else np.zeros((n, views), np.uint8)
    return boxes, flips


def color_matrix(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    """The 3x3 RGB matrix of fn.hsv(hue, saturation, value): the torch baseline applies it."""
    a = np.deg2rad(hue_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    return value * _YIQ_INV @ np.diag([1.0, saturation, saturation]) @ rot @ _YIQ


@dataclass
class EpochPlan:
    """What one rank reads in one epoch: image indices, boxes and flips, step by step."""

    index: np.ndarray  # (steps * batch,) int64
    boxes: np.ndarray  # (steps * batch, V, 4) int32: y, x, h, w
    flips: np.ndarray  # (steps * batch, V) uint8
    color: np.ndarray  # (steps * batch, V, 3) float32: hue, saturation, value
    batch_size: int

    @property
    def steps(self) -> int:
        return len(self.index) // self.batch_size

    def step(self, k: int):
        s = slice(k * self.batch_size, (k + 1) * self.batch_size)
        return self.index[s], self.boxes[s], self.flips[s], self.color[s]


def global_batches(order: np.ndarray, batch_size: int, world: int) -> np.ndarray:
    """An epoch's shuffled ``order`` cut into whole global batches: (steps, world, batch_size);
    rank r's step k is ``[k, r]`` (the last partial global batch is dropped)."""
    steps = steps_per_epoch(len(order), batch_size, world)
    return order[: steps * batch_size * world].reshape(steps, world, batch_size)


def make_epoch_plan(n: int, batch_size: int, plan_fn: PlanFn, seed: int, epoch: int,
                    rank: int = 0, world: int = 1) -> EpochPlan:
    """Shuffle, draw every image's crops, and keep this rank's shard (whole batches only)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    boxes, flips, color = plan_fn(rng, n)  # drawn for all n: the plan is independent of world size
    take = global_batches(perm, batch_size, world)[:, rank].reshape(-1)
    return EpochPlan(take.astype(np.int64), boxes[take], flips[take], color[take], batch_size)


class _Loader:
    """Common epoch bookkeeping of the pipelines: ``set_epoch(e, start_step)`` then iterate."""

    def __init__(self, split: Split, plan_fn: Optional[PlanFn], batch_size: int, seed: int, rank: int, world: int,
                 items: Optional[int] = None):
        """``items``: samples per epoch when they are not the split's images (e.g. surrogate patches)."""
        self.split, self.plan_fn = split, plan_fn
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.start_step = 0, 0
        n = len(split) if items is None else items
        self.steps_per_epoch = steps_per_epoch(n, batch_size, world)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} {'images' if items is None else 'samples'} are fewer than one global batch of "
                             f"{batch_size} x {world}")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return make_epoch_plan(len(self.split), self.batch_size, self.plan_fn, self.seed, epoch, self.rank, self.world)

    def plan(self) -> EpochPlan:
        return self.epoch_plan(self.epoch)


# --------------------------------------------------------------------------- DALI


class _PlanSource:
    """Iterable for ``fn.external_source``: one epoch of a loader's plan, batch by batch
    (``loader.epoch_plan(epoch)`` and ``loader.step_inputs(plan, k)`` say what goes in).

    DALI calls ``iter()`` on the source when it builds the graph, again before the first
    batch, and by itself after an epoch ends (it may prefetch from the next one before the
    training loop asks for it).  So the source owns the schedule: until an epoch has been
    served to its end it starts at ``(loader.epoch, loader.start_step)``; after that, every
    new pass is the next epoch from step 0.
    """

    def __init__(self, loader: "DaliLoader"):
        self.loader = loader
        self.finished = None  # last epoch served to its end

    def __iter__(self):
        l = self.loader
        if self.finished is None:
            self.epoch, self.k = l.epoch, l.start_step
        else:
            self.epoch, self.k = self.finished + 1, 0
        self.plan = l.epoch_plan(self.epoch)
        return self

    def __next__(self):
        if self.k >= self.plan.steps:
            self.finished = self.epoch
            raise StopIteration
        self.k += 1
        return self.loader.step_inputs(self.plan, self.k - 1)


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


def build_dali_pipeline(source, num_views: int, device: str, batch_size: int, num_threads: int,
                        device_id: Optional[int], base_size: int, out_size: int, resize: bool,
                        encoded: bool, mean, std, color: bool = False, prefetch: int = 2, seed: int = 0,
                        transform=None):
    """The crop pipeline, for device 'gpu' or 'cpu' (same graph).  ``transform`` (a method's
    view transform, e.g. data.color.ColorSplit) replaces the final normalisation: it maps each
    flipped HWC uint8 view to its own outputs (``transform.num_outputs`` per view)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=seed)
    def crops():
        per_view = 4 if color else 3
        outs = fn.external_source(source=source, num_outputs=2 + per_view * num_views, batch=True, cycle="raise")
        images, index = outs[0], outs[1]
        if encoded:
            images = dali_decode(images, device, base_size)
        elif device == "gpu":
            images = images.gpu()
        views = []
        for v in range(num_views):
            anchor, shape, flip, *hsv = outs[2 + per_view * v: 2 + per_view * (v + 1)]
            x = fn.slice(images, anchor, shape, axis_names="HW")
            if resize:
                x = fn.resize(x, size=(out_size, out_size), antialias=True)
            if color:
                h = hsv[0]
                x = fn.hsv(x, hue=h[0], saturation=h[1], value=h[2], dtype=types.FLOAT)
            if transform is not None:
                views.extend(transform.dali(fn.flip(x, horizontal=flip), out_size))
                continue
            x = fn.crop_mirror_normalize(x, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                         mean=[255 * m for m in mean], std=[255 * s for s in std])
            views.append(x)
        return (*views, index)

    return crops()


class DaliLoader(_Loader):
    """DALI pipeline + ``DALIGenericIterator``, one pipeline per process (sharded by rank)."""

    def __init__(self, split, plan_fn, num_views, batch_size, seed, rank, world, device, base_size,
                 out_size, resize, mean, std, color=False, num_threads=2, prefetch=2, device_id=None,
                 transform=None):
        super().__init__(split, plan_fn, batch_size, seed, rank, world)
        self.num_views, self.color = num_views, color
        outs = num_views * (transform.num_outputs if transform is not None else 1)
        self.init_iter([f"view{v}" for v in range(outs)] + ["index"], lambda src: build_dali_pipeline(
            src, num_views, device, batch_size, max(1, num_threads), device_id if device == "gpu" else None,
            base_size, out_size, resize, split.encoded, mean, std, color, prefetch, seed, transform))

    def init_iter(self, names, build):
        """Outputs ``names`` (the last is the index) of the pipeline ``build(source)``, which is
        built on first use, after set_epoch."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.source = _PlanSource(self)
        self.names, self._it = names, None
        self._make_iter = lambda: DALIGenericIterator([build(self.source)], self.names, auto_reset=False)
        self.epoch, self.start_step = 0, 0

    def step_inputs(self, plan: EpochPlan, k: int):
        """The external source's inputs of step k: images, index, and each view's crop."""
        idx, boxes, flips, color = plan.step(k)
        out = [dali_images(self.split, idx), list(idx.reshape(-1, 1))]
        for v in range(boxes.shape[1]):
            out.append(list(np.ascontiguousarray(boxes[:, v, :2])))  # anchor (y, x)
            out.append(list(np.ascontiguousarray(boxes[:, v, 2:])))  # shape (h, w)
            out.append(list(flips[:, v].astype(np.int32)))
            if self.color:
                out.append(list(np.ascontiguousarray(color[:, v])))  # hue, saturation, value
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


# --------------------------------------------------------------------------- torchvision baseline


def crop_views_torch(img: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, color: np.ndarray,
                     out_size: int, resize: bool, apply_color: bool, mean: torch.Tensor,
                     std: torch.Tensor, transform=None) -> List[torch.Tensor]:
    """The same maths as the DALI graph, with torchvision ops, for one CHW uint8 image."""
    import torchvision.transforms.v2.functional as TF

    views = []
    for (y, x, h, w), flip, hsv in zip(boxes.tolist(), flips.tolist(), color.tolist()):
        v = TF.crop(img, y, x, h, w)
        if resize:
            v = TF.resize(v, [out_size, out_size], antialias=True)
        if flip:
            v = TF.horizontal_flip(v)
        if transform is not None:
            views.extend(transform.torch(v))
            continue
        v = v.float()
        if apply_color:
            m = torch.from_numpy(color_matrix(*hsv)).float()
            v = torch.einsum("ij,jhw->ihw", m, v)
        views.append((v / 255.0 - mean) / std)
    return views


def load_image_file(path: str, size: int) -> torch.Tensor:
    """Decode with PIL, resize the shorter side to ``size`` and centre-crop: CHW uint8."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    with Image.open(path) as im:
        t = TF.pil_to_tensor(im.convert("RGB"))
    t = TF.resize(t, size, antialias=True)
    return TF.center_crop(t, [size, size])


def to_chw(images) -> torch.Tensor:
    """A list/array of HWC uint8 images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(x) for x in images])).permute(0, 3, 1, 2)


def split_images(split: Split, index, size: int) -> torch.Tensor:
    """(len(index), 3, size, size) uint8 whole images of a split (decoded with PIL for folders)."""
    if split.encoded:
        return torch.stack([load_image_file(split.files[int(i)], size) for i in index])
    return to_chw([split.images[int(i)] for i in index])


class _BatchDataset(torch.utils.data.Dataset):
    """Item k = step k of the epoch plan, as a whole batch (workers build batches in parallel)."""

    def __init__(self, loader: "TorchLoader", plan: EpochPlan):
        self.l, self.plan = loader, plan

    def __len__(self):
        return self.plan.steps - self.l.start_step

    def __getitem__(self, k):
        idx, boxes, flips, color = self.plan.step(k + self.l.start_step)
        l, split = self.l, self.l.split
        outs = boxes.shape[1] * (l.transform.num_outputs if l.transform is not None else 1)
        per_view: List[List[torch.Tensor]] = [[] for _ in range(outs)]
        for j, i in enumerate(idx):
            if split.encoded:
                img = load_image_file(split.files[i], l.base_size)
            else:
                img = torch.from_numpy(np.ascontiguousarray(split.images[i])).permute(2, 0, 1)
            views = crop_views_torch(img, boxes[j], flips[j], color[j], l.out_size, l.resize, l.color, l.mean, l.std,
                                     l.transform)
            for v, t in enumerate(views):
                per_view[v].append(t)
        return {"views": [torch.stack(p) for p in per_view], "index": torch.from_numpy(idx)}


def _worker_init(_):
    """Forked workers inherit the parent's objects, a DALI pipeline among them where one exists;
    collecting such an object in the child runs its destructor, which waits for threads that
    only exist in the parent (a hang).  The workers never need to free what they inherited."""
    import gc

    gc.freeze()


class TorchLoader(_Loader):
    """torchvision + ``DataLoader`` executor of the same plan: the baseline."""

    def __init__(self, split, plan_fn, num_views, batch_size, seed, rank, world, base_size, out_size,
                 resize, mean, std, color=False, num_workers=2, prefetch=2, pin_memory=False, transform=None):
        super().__init__(split, plan_fn, batch_size, seed, rank, world)
        self.base_size, self.out_size, self.resize, self.color = base_size, out_size, resize, color
        self.transform = transform
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory

    def batch_dataset(self, plan):
        return _BatchDataset(self, plan)

    def __iter__(self):
        ds = self.batch_dataset(self.plan())
        kw = dict(prefetch_factor=self.prefetch, persistent_workers=False) if self.num_workers > 0 else {}
        dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, worker_init_fn=_worker_init, **kw)
        yield from dl


# --------------------------------------------------------------------------- factory


def resolve_pipeline(name: str) -> str:
    if name == "auto":
        return "dali-gpu" if torch.cuda.is_available() else "dali-cpu"
    return name


def build_loader(cfg, source, split: Split, method, rank: int = 0, world: int = 1, device_id=None):
    """The pretraining loader for ``method``'s recipe on ``split``, per ``data.pipeline``."""
    own = method.make_loader(cfg, source, rank, world, device_id)
    if own is not None:
        return own
    kind = resolve_pipeline(cfg.data.pipeline)
    common = dict(split=split, plan_fn=method.crop_plan, num_views=method.num_views,
                  batch_size=cfg.data.batch_size, seed=cfg.seed, rank=rank, world=world,
                  base_size=source.image_size, out_size=method.view_size, resize=method.resize_views,
                  mean=source.mean, std=source.std, color=method.color_jitter, transform=method.view_transform)
    if kind == "torch":
        return TorchLoader(**common, num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch,
                           pin_memory=torch.cuda.is_available())
    if kind == "dali-gpu":  # a graph the GPU backend refuses fails here, in one line, not at the first batch
        from fastssl.data.dali_check import check_gpu_graph, crop_pipeline

        check_gpu_graph(lambda: crop_pipeline(method, source, split, cfg.data.batch_size),
                        f"the {method.name} crop graph")
    return DaliLoader(**common, device="gpu" if kind == "dali-gpu" else "cpu",
                      num_threads=max(1, cfg.data.num_workers), prefetch=cfg.data.prefetch, device_id=device_id)
