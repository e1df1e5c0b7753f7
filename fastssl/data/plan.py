"""The view plan: what every view of every image of an epoch looks like, drawn on the host.

A recipe's ``draw(rng, n)`` returns named fields, each an array of shape ``(n, views, ...)``
(``box`` (y, x, h, w), ``flip``, ``hsv`` (hue degrees, saturation, value), ``grey``, ``blur``
sigma, ...; ``fastssl/data/ops`` says which op reads which).  The plan of an epoch is drawn
from ``(seed, epoch)`` only, so

* every executor cuts exactly the same pixels (tests compare each executor with the torch faces),
* a run resumed mid-epoch re-creates the epoch's plan and skips the steps already done, and
* DDP ranks agree on the permutation and take disjoint shards of it (a rank's crops do not
  depend on the world size: fields are drawn for all n images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from fastssl.errors import ConfigError

Fields = Dict[str, np.ndarray]
DrawFn = Callable[[np.random.Generator, int], Fields]


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Whole global batches per epoch (the last partial batch is dropped on every rank)."""
    return n // (batch_size * world)


def global_batches(order: np.ndarray, batch_size: int, world: int) -> np.ndarray:
    """An epoch's shuffled ``order`` cut into whole global batches: (steps, world, batch_size);
    rank r's step k is ``[k, r]`` (the last partial global batch is dropped)."""
    steps = steps_per_epoch(len(order), batch_size, world)
    return order[: steps * batch_size * world].reshape(steps, world, batch_size)


@dataclass
class ViewPlan:
    """What one rank reads in one epoch (or one step): image indices and named per-view fields."""

    index: np.ndarray  # (n,) int64: what the batch reports (image indices, or e.g. surrogate member rows)
    fields: Fields  # name -> (n, views, ...)
    batch_size: int
    images: Optional[np.ndarray] = None  # (n,) images to read when they are not ``index``

    @property
    def steps(self) -> int:
        return len(self.index) // self.batch_size

    @property
    def sources(self) -> np.ndarray:
        """The image of each sample."""
        return self.index if self.images is None else self.images

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fields[name]

    def step(self, k: int) -> "ViewPlan":
        s = slice(k * self.batch_size, (k + 1) * self.batch_size)
        return ViewPlan(
            self.index[s],
            {n: a[s] for n, a in self.fields.items()},
            self.batch_size,
            None if self.images is None else self.images[s],
        )


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """(the epoch's generator, this rank's images in order): the shuffle, the first draw of the
    epoch's generator, so that a file reader can follow the plan without drawing the views."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    return rng, global_batches(perm, batch_size, world)[:, rank].reshape(-1).astype(np.int64)


def make_epoch_plan(
    n: int,
    batch_size: int,
    draw: DrawFn,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    shapes: Optional[np.ndarray] = None,
) -> ViewPlan:
    """Shuffle, draw every image's views, and keep this rank's shard (whole batches only).
    ``shapes``: (n, 2) frame height, width of each image when they differ (folders; the draw
    gets them as ``draw(rng, n, shapes)``), None when every image is the recipe's square."""
    rng, take = epoch_order(n, batch_size, seed, epoch, rank, world)
    fields = draw(rng, n) if shapes is None else draw(rng, n, shapes)  # for all n: independent of world size
    return ViewPlan(take, {k: v[take] for k, v in fields.items()}, batch_size)


# --------------------------------------------------------------------------- crops over whole images


def frame_shapes(sizes: np.ndarray, base: int) -> np.ndarray:
    """(n, 2) height, width of each image scaled so that its shorter side is ``base``: the frame
    a recipe draws its boxes in, so that its pixel sizes (a 64 px patch of a 96 px image) keep
    their meaning on images of any size, and a box can lie anywhere on the whole image."""
    sizes = np.asarray(sizes, np.int64)
    short = sizes.min(1, keepdims=True).clip(1)
    return np.maximum(base, np.round(sizes * base / short)).astype(np.int64)


def to_image_boxes(box: np.ndarray, sizes: np.ndarray, base: int) -> np.ndarray:
    """Frame boxes (n, views, 4) of images of ``sizes`` (n, 2) -> the same boxes in each image's
    own pixels (y, x, h, w; at least 1 px, inside the image)."""
    sizes = np.asarray(sizes, np.int64)
    scale = (sizes.min(1) / base)[:, None, None]  # image pixels per frame pixel
    y0 = np.floor(box[..., 0:2] * scale + 1e-6).astype(np.int64)
    y1 = np.ceil((box[..., 0:2] + box[..., 2:4]) * scale - 1e-6).astype(np.int64)
    hi = sizes[:, None, :]
    y0 = np.minimum(y0, hi - 1)
    y1 = np.clip(y1, y0 + 1, hi)
    return np.concatenate([y0, y1 - y0], -1).astype(np.int32)


def union_roi(box: np.ndarray):
    """The region each image is decoded to (the smallest box holding all its views) and the
    views' boxes inside that region: (roi (B, 4), boxes (B, views, 4)), y, x, h, w."""
    lo = box[..., 0:2].min(1)
    hi = (box[..., 0:2] + box[..., 2:4]).max(1)
    roi = np.concatenate([lo, hi - lo], -1).astype(np.int32)
    rel = box.copy()
    rel[..., 0:2] -= lo[:, None, :]
    return roi, rel


def check_fields(fields: Fields, n: int, views: int, needed, who: str = "the recipe") -> None:
    """Every field an op reads is there with shape (n, views, ...); the error names the field."""
    for name in needed:
        if name not in fields:
            raise ValueError(
                f"{who}: its ops read plan field {name!r}, which its draw does not make "
                f"(it makes {', '.join(sorted(fields)) or 'nothing'})"
            )
        if fields[name].shape[:2] != (n, views):
            raise ValueError(f"{who}: plan field {name!r} has shape {fields[name].shape}, expected ({n}, {views}, ...)")


# --------------------------------------------------------------------------- drawing helpers


def positions(rng: np.random.Generator, span: np.ndarray, shape) -> np.ndarray:
    """Uniform integers in [0, span) per image (``span`` (n, ...) broadcast to ``shape``), for
    frames of different sizes (in-memory sources draw with ``rng.integers`` on one span)."""
    return np.floor(rng.random(shape) * np.broadcast_to(span, shape)).astype(np.int64)


def square_crops(
    rng: np.random.Generator,
    n: int,
    views: int,
    side: int,
    image_size: int,
    flip: bool,
    shapes: Optional[np.ndarray] = None,
):
    """Boxes (n, views, 4) of side x side squares at uniform random positions, and flips (n, views);
    ``shapes`` (n, 2): over frames of these sizes instead of image_size squares."""
    if shapes is None:
        yx = rng.integers(0, image_size - side + 1, size=(n, views, 2), dtype=np.int32)
    else:
        yx = positions(rng, (shapes - side + 1)[:, None, :], (n, views, 2)).astype(np.int32)
    boxes = np.concatenate([yx, np.full((n, views, 2), side, np.int32)], axis=2)
    flips = rng.integers(0, 2, size=(n, views), dtype=np.uint8) if flip else np.zeros((n, views), np.uint8)
    return boxes, flips


@dataclass
class ColorJitter:
    """Per-view HSV change drawn in the plan (config ``method.color``; defaults: none)."""

    hue: float = 0.0  # rotation drawn uniformly in [-hue, hue] degrees
    saturation: List[float] = field(default_factory=lambda: [1.0, 1.0])  # multiplier range (0 = grey)
    value: List[float] = field(default_factory=lambda: [1.0, 1.0])  # brightness multiplier range

    @property
    def active(self) -> bool:
        return jitter_active(self)


def jitter_active(jitter) -> bool:
    """Whether a ColorJitter (dataclass or config node) changes anything."""
    return jitter.hue != 0 or list(jitter.saturation) != [1.0, 1.0] or list(jitter.value) != [1.0, 1.0]


def check_jitter(jitter, key: str = "method.color") -> None:
    """Refuse impossible colour-change settings, naming the key (ConfigError)."""
    if not 0 <= jitter.hue <= 180:
        raise ConfigError(f"{key}.hue: must be in [0, 180] degrees, got {jitter.hue}")
    for k in ("saturation", "value"):
        r = list(getattr(jitter, k))
        if len(r) != 2 or not 0 <= r[0] <= r[1]:
            raise ConfigError(f"{key}.{k}: must be a range [lo, hi] with 0 <= lo <= hi, got {r}")


def draw_hsv(rng: np.random.Generator, n: int, views: int, jitter) -> np.ndarray:
    """(n, views, 3) float32: hue degrees, saturation and value multipliers."""
    out = np.empty((n, views, 3), np.float32)
    out[..., 0] = rng.uniform(-jitter.hue, jitter.hue, (n, views)) if jitter.hue else 0.0
    out[..., 1] = rng.uniform(*jitter.saturation, (n, views))
    out[..., 2] = rng.uniform(*jitter.value, (n, views))
    return out


def draw_blur(rng: np.random.Generator, n: int, views: int, prob: float, sigma) -> np.ndarray:
    """(n, views) float32 Gaussian-blur sigma per view, 0 = not blurred (probability ``prob``)."""
    on = rng.random((n, views)) < prob
    return np.where(on, rng.uniform(sigma[0], sigma[1], (n, views)), 0.0).astype(np.float32)
