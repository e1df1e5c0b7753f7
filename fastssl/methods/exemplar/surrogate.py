"""Exemplar-CNN surrogate classes (Dosovitskiy et al. 2016): seed patches, transformation
parameters, and the surrogate plan and recipe every executor runs.

A *surrogate class* is one seed image (or, after clustering, a few similar images): its seed
patch sits at an anchor pixel drawn with probability proportional to the Sobel edge magnitude,
and every patch of the class is that seed patch under a random transformation:

* translation of the window centre, a Normal draw (sigma = translate / 2) clipped to
  +-``translate`` x patch side,
* scale s in [0.7, 1.4] (the window covers patch / s source pixels: the image is, in effect,
  up- or down-scaled so that the scaled crop fits),
* rotation in [-20, 20] degrees,
* contrast 1: the projection of every pixel on the principal components of the set's pixels
  is multiplied by a factor in [0.5, 2] per component (log-uniform),
* contrast 2: saturation and value (HSV) raised to a power in [0.25, 4] (log-uniform),
  multiplied by [0.7, 1.4] and shifted by [-0.1, 0.1],
* colour: hue shifted by [-0.1, 0.1] of the hue circle.

The authors' code (``EricArazo/ExemplarCNN``, ``transformations.py``) draws some of these
differently; each is a switch of ``SurrogateAug`` (defaults: the paper's text, as before):
``flip`` (a horizontal flip with that probability, folded into the affine matrix), ``pca_basis``
(``patch``: the principal components of each patch's own pixels), ``sv_shared`` (one power,
factor and offset for both saturation and value), ``draw`` (``uniform``: PCA factors and powers
drawn uniformly, as ``np.random.uniform`` there) and ``stretch`` (every patch stretched to
[0, 255] by its own minimum and maximum after the PCA contrast and after the HSV round trip,
saturation and value not clipped).

The parameters are drawn on the host from ``(seed, epoch, step)`` (so resumed runs, DDP ranks
and every executor agree) as the plan fields ``affine`` (one 2x3 matrix per patch), ``cmat`` and
``coff`` (the PCA contrast) and ``hsvp``; the ops ``WarpAffine``, ``ColourMatrix`` and
``HSVPower`` (``methods/exemplar/ops.py``) make the pixels on any executor.  Patches leave as
32x32x3 uint8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.data.decode import split_images
from fastssl.data.executors.base import run_torch
from fastssl.data.ops import ViewContext
from fastssl.data.plan import ViewPlan, global_batches
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split
from fastssl.errors import ConfigError, choice
from fastssl.methods.exemplar.ops import ColourMatrix, HSVPower, WarpAffine


@dataclass
class SurrogateAug:
    """Ranges of the six transformation families (Dosovitskiy et al. 2016)."""

    translate: float = 0.2  # max shift of the window centre, as a fraction of the patch side
    scale: List[float] = field(default_factory=lambda: [0.7, 1.4])
    rotate: float = 20.0  # degrees, +-
    pca: List[float] = field(default_factory=lambda: [0.5, 2.0])  # factor per principal component
    sv_power: List[float] = field(default_factory=lambda: [0.25, 4.0])  # saturation and value exponent
    sv_mul: List[float] = field(default_factory=lambda: [0.7, 1.4])
    sv_add: List[float] = field(default_factory=lambda: [-0.1, 0.1])
    hue: float = 0.1  # +- fraction of the hue circle
    # where the paper's text is silent, the authors' code (docs/fidelity.md); where it is explicit, the text
    flip: float = 0.5  # probability of a horizontal flip (authors: 0.5; the text does not mention one)
    pca_basis: Literal["set", "patch"] = (
        "set"  # set: components of the set's pixels (paper) | patch: each patch's own (authors)
    )
    sv_shared: bool = True  # one power, factor and offset for S and V (authors; the text: "a power") | false
    draw: Literal["loguniform", "uniform"] = (
        "uniform"  # PCA factors and S/V powers: uniform (authors; the text gives ranges) | loguniform
    )
    stretch: bool = True  # every patch stretched to [0, 255] by its min/max, S and V unclipped (authors) | false


def check_aug(a, key: str = "method.aug") -> None:
    def rng(name, lo_min, positive=False):
        r = list(getattr(a, name))
        if len(r) != 2 or not r[0] <= r[1] or r[0] < lo_min or (positive and r[0] <= 0):
            raise ConfigError(
                f"{key}.{name}: must be a range [lo, hi] with {lo_min} {'<' if positive else '<='} lo <= hi, got {r}"
            )

    if not 0 <= a.translate <= 1:
        raise ConfigError(f"{key}.translate: must be in [0, 1] (fraction of the patch side), got {a.translate}")
    if not 0 <= a.rotate <= 180:
        raise ConfigError(f"{key}.rotate: must be in [0, 180] degrees, got {a.rotate}")
    if not 0 <= a.hue <= 0.5:
        raise ConfigError(f"{key}.hue: must be in [0, 0.5] of the hue circle, got {a.hue}")
    for name in ("scale", "pca", "sv_power", "sv_mul"):
        rng(name, 0, positive=True)
    rng("sv_add", -1)
    if not 0 <= a.flip <= 1:
        raise ConfigError(f"{key}.flip: must be a probability in [0, 1], got {a.flip}")
    for name in ("sv_shared", "stretch"):
        if not isinstance(getattr(a, name), bool):
            raise ConfigError(f"{key}.{name}: must be true or false, got {getattr(a, name)!r}")


# --------------------------------------------------------------------------- seed patches


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey level: (N, 3, H, W) uint8 -> (N, H, W) float."""
    g = (
        images.float()
        .mul(torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1))
        .sum(1, keepdim=True)
    )
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)
    d = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k)
    return d.pow(2).sum(1).sqrt()


def sample_anchors(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One anchor (y, x) per image, in pixel-centre coordinates (pixel i spans [i, i + 1]),
    drawn with probability proportional to the Sobel magnitude (uniform on a flat image)."""
    e = sobel_edges(images).flatten(1).cpu().double()
    e = e + 1e-12 * (e.sum(1, keepdim=True) == 0)  # a flat image: uniform
    flat = torch.multinomial(e, 1, generator=generator).squeeze(1)
    w = images.shape[-1]
    return torch.stack([flat // w, flat % w], 1).float() + 0.5


def pca_basis(images: torch.Tensor, max_pixels: int = 2_000_000, seed: int = 0):
    """Mean (3,) and principal axes (3, 3, columns) of the pixels of ``images`` on [0, 1]."""
    px = images.permute(0, 2, 3, 1).reshape(-1, 3).double() / 255.0
    if len(px) > max_pixels:
        px = px[torch.randperm(len(px), generator=torch.Generator().manual_seed(seed))[:max_pixels]]
    mean = px.mean(0)
    _, vecs = torch.linalg.eigh(torch.cov((px - mean).T))
    return mean.float().numpy(), vecs.float().numpy()


@dataclass
class SurrogateSet:
    """Which images make up which surrogate class, and each image's seed-patch anchor."""

    members: np.ndarray  # (M,) int64 image indices into the pre-training split
    labels: np.ndarray  # (M,) int64 class of each member (0..num_classes-1)
    anchors: np.ndarray  # (M, 2) float32 (y, x) seed-patch centres
    num_classes: int

    def items(self, per_class: int) -> np.ndarray:
        """(num_classes * per_class,) member row of every patch of an epoch: the ``per_class``
        patches of a class are spread over its members in turn."""
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=self.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        full = counts > 0  # (a class budget clustering could not fill leaves classes empty)
        j = np.arange(per_class)
        rows = order[starts[full, None] + j[None, :] % counts[full, None]].reshape(-1)
        return np.resize(rows, self.num_classes * per_class)  # same epoch length: the rest repeats

    def state(self):
        return {
            "members": torch.from_numpy(self.members),
            "labels": torch.from_numpy(self.labels),
            "anchors": torch.from_numpy(self.anchors),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_state(cls, s):
        return cls(s["members"].numpy(), s["labels"].numpy(), s["anchors"].numpy(), int(s["num_classes"]))


def make_surrogate_set(
    split: Split,
    image_size: int,
    members: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    batch: int = 1024,
) -> SurrogateSet:
    """Anchors for ``members`` (Sobel-weighted), in batches."""
    g = torch.Generator().manual_seed(seed)
    anchors = [
        sample_anchors(split_images(split, members[s : s + batch], image_size), g)
        for s in range(0, len(members), batch)
    ]
    return SurrogateSet(
        np.asarray(members, np.int64),
        np.asarray(labels, np.int64),
        torch.cat(anchors).numpy().astype(np.float32),
        num_classes,
    )


def seed_surrogate_set(cfg, source):
    """The first surrogate set: ``num_classes`` random images of the pre-training split, one class
    each, with Sobel-sampled anchors; and the PCA basis of their pixels."""
    m = cfg.method
    members = np.sort(np.random.default_rng([cfg.seed, 11]).choice(len(source.pretrain), m.num_classes, replace=False))
    sset = make_surrogate_set(
        source.pretrain, source.image_size, members, np.arange(m.num_classes), m.num_classes, cfg.seed
    )
    sample = members[:2000]
    return sset, pca_basis(split_images(source.pretrain, sample, source.image_size), seed=cfg.seed)


# --------------------------------------------------------------------------- transformation parameters


@dataclass
class PatchParams:
    """Per-patch parameters in the form both executors consume."""

    affine: np.ndarray  # (n, 2, 3) float32: output (x, y, 1) -> source (x, y), pixel-centre coords
    cmat: np.ndarray  # (n, 3, 3) float32: colour matrix on [0, 255] RGB
    coff: np.ndarray  # (n, 3) float32: colour offset on [0, 255]
    hsv: np.ndarray  # (n, 7) float32: sat power, mul, add, value power, mul, add, hue shift
    pcaf: Optional[np.ndarray] = None  # (n, 3) float32 PCA factors (pca_basis=patch: the op fits each patch)

    def __getitem__(self, s):
        pcaf = None if self.pcaf is None else self.pcaf[s]
        return PatchParams(self.affine[s], self.cmat[s], self.coff[s], self.hsv[s], pcaf)


def _loguniform(rng, lo_hi, size):
    lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1])
    return np.exp(rng.uniform(lo, hi, size))


def _uniform(rng, lo_hi, size):
    return rng.uniform(lo_hi[0], lo_hi[1], size)


def draw_params(rng: np.random.Generator, anchors: np.ndarray, aug, patch: int, image_size: int, pca) -> PatchParams:
    """Random transformations of the seed patches centred at ``anchors`` (n, 2).  The draws come
    in a fixed order; the authors' switches (``sv_shared``, ``flip``) change it only when set."""
    n = len(anchors)
    draw = _uniform if getattr(aug, "draw", "loguniform") == "uniform" else _loguniform
    shift = np.clip(rng.normal(0.0, aug.translate * patch / 2, (n, 2)), -aug.translate * patch, aug.translate * patch)
    scale = rng.uniform(*aug.scale, n)
    angle = rng.uniform(-aug.rotate, aug.rotate, n)
    pcaf = draw(rng, aug.pca, (n, 3))
    if getattr(aug, "sv_shared", False):  # the authors' HSV_contrast_2: one power, factor, offset for S and V
        power, mul, add = draw(rng, aug.sv_power, n), rng.uniform(*aug.sv_mul, n), rng.uniform(*aug.sv_add, n)
        hsv = np.stack([power, mul, add, power, mul, add, rng.uniform(-aug.hue, aug.hue, n)], 1)
    else:
        hsv = np.stack(
            [
                draw(rng, aug.sv_power, n),
                rng.uniform(*aug.sv_mul, n),
                rng.uniform(*aug.sv_add, n),
                draw(rng, aug.sv_power, n),
                rng.uniform(*aug.sv_mul, n),
                rng.uniform(*aug.sv_add, n),
                rng.uniform(-aug.hue, aug.hue, n),
            ],
            1,
        )
    p = getattr(aug, "flip", 0.0)
    flip = rng.random(n) < p if p > 0 else None  # drawn last: no flip leaves the other draws as they were
    out = make_params(anchors, shift, scale, angle, pcaf, hsv, patch, image_size, pca, flip)
    if getattr(aug, "pca_basis", "set") == "patch":
        out.pcaf = np.asarray(pcaf, np.float32)
    return out


IDENTITY_HSV = np.array([1, 1, 0, 1, 1, 0, 0], np.float32)


def make_params(
    anchors, shift, scale, angle_deg, pca_factors, hsv, patch: int, image_size: int, pca, flip=None
) -> PatchParams:
    """Explicit parameters -> matrices.  The window (side patch / scale, rotated) is centred at
    anchor + shift, moved inside the image when it fits (border pixels repeat when it does not).
    ``flip`` (n,) bool: those patches mirrored left-right (output x -> patch - x, in the matrix)."""
    n = len(anchors)
    a = np.deg2rad(np.asarray(angle_deg, np.float64))
    s = np.asarray(scale, np.float64)
    c, sn = np.cos(a), np.sin(a)
    half = patch / (2 * s) * (np.abs(c) + np.abs(sn))  # half-extent of the rotated window
    centre = np.asarray(anchors, np.float64)[:, ::-1] + np.asarray(shift, np.float64)[:, ::-1]  # (x, y)
    lo, hi = half[:, None], image_size - half[:, None]
    centre = np.where(hi >= lo, np.clip(centre, lo, hi), image_size / 2)
    A = np.stack([np.stack([c, -sn], 1), np.stack([sn, c], 1)], 1) / s[:, None, None]  # (n, 2, 2)
    b = centre - np.einsum("nij,j->ni", A, np.array([patch / 2, patch / 2]))
    if flip is not None:  # source = A (patch - x, y) + b: the first column negated, b moved by patch x it
        f = np.asarray(flip, bool)
        b = np.where(f[:, None], b + A[:, :, 0] * patch, b)
        A = np.where(f[:, None, None], A * np.array([-1.0, 1.0]), A)
    affine = np.concatenate([A, b[:, :, None]], 2).astype(np.float32)
    mean, vecs = (np.zeros(3), np.eye(3)) if pca is None else pca
    m = np.einsum("ij,nj,kj->nik", vecs, np.asarray(pca_factors, np.float64), vecs)  # U diag(f) U^T
    coff = 255.0 * (mean - np.einsum("nij,j->ni", m, mean))
    return PatchParams(affine, m.astype(np.float32), coff.astype(np.float32), np.asarray(hsv, np.float32).reshape(n, 7))


# --------------------------------------------------------------------------- the plan and the recipe


def surrogate_ops(patch: int, aug=None):
    """The ops of one patch: geometry, PCA contrast, HSV powers (-> HWC uint8); ``aug``'s
    ``pca_basis`` and ``stretch`` choose the ops' variants (None: the defaults)."""
    per_patch = aug is not None and aug.pca_basis == "patch"
    stretch = aug is not None and bool(aug.stretch)
    return [WarpAffine(patch), ColourMatrix(per_patch=per_patch), HSVPower(stretch=stretch)]


def patch_recipe(patch: int, aug=None, **plan) -> Recipe:
    """The surrogate ops as a one-view recipe; ``plan``/``items`` make it a training recipe
    (``surrogate_recipe``), without them it serves explicit parameters (graphs, references)."""
    return Recipe(None, surrogate_ops(patch, aug), views=1, size=patch, name="exemplar surrogate", **plan)


def surrogate_pipeline(patch: int, encoded: bool, image_size: int, batch_size: int, aug=None):
    """The dali-gpu graph of the surrogate ops (what build_loader builds for the surrogate
    recipe), fed by an empty source: for its graph only (the tests compare it)."""
    from fastssl.data.executors.dali import build_dali_pipeline

    return build_dali_pipeline(
        [], patch_recipe(patch, aug), "gpu", batch_size, 1, 0, image_size, encoded, (0.5,) * 3, (0.25,) * 3
    )


def param_fields(p: PatchParams):
    """PatchParams as plan fields of one view: (n, 1, ...) each."""
    out = {"affine": p.affine[:, None], "cmat": p.cmat[:, None], "coff": p.coff[:, None], "hsvp": p.hsv[:, None]}
    if p.pcaf is not None:
        out["pcaf"] = p.pcaf[:, None]
    return out


class SurrogatePlan:
    """One epoch of one rank: the member row of every patch, step by step, and the parameters
    (drawn per global step from ``(seed, epoch, step)``).  ``step(k)`` is a ViewPlan whose
    ``index`` is the member rows (their labels are the classes) and whose ``images`` are the
    images those members are.  ``fixed`` (PatchParams of every item): the parameters of a set drawn
    once (``method.surrogate=fixed``); each epoch then shows the same patches in a new order."""

    def __init__(
        self,
        items: np.ndarray,
        sset: SurrogateSet,
        aug,
        patch,
        image_size,
        pca,
        batch_size,
        seed,
        epoch,
        rank,
        world,
        fixed: Optional[PatchParams] = None,
    ):
        self.sset, self.aug, self.patch, self.image_size, self.pca = sset, aug, patch, image_size, pca
        self.batch_size, self.seed, self.epoch, self.rank, self.world = batch_size, seed, epoch, rank, world
        self.pos = global_batches(np.random.default_rng([seed, epoch]).permutation(len(items)), batch_size, world)
        self.rows = items[self.pos]
        self.fixed = fixed
        self.steps = len(self.rows)

    def step(self, k: int) -> ViewPlan:
        rows = self.rows[k].reshape(-1)
        if self.fixed is not None:
            params = self.fixed[self.pos[k].reshape(-1)]
        else:
            rng = np.random.default_rng([self.seed, self.epoch, k, 7])
            params = draw_params(rng, self.sset.anchors[rows], self.aug, self.patch, self.image_size, self.pca)
        s = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return ViewPlan(rows[s], param_fields(params[s]), self.batch_size, images=self.sset.members[rows[s]])


SurrogateMode = Literal["per_epoch", "fixed"]  # a config field's type (Exemplar-CNN's method.surrogate)
SURROGATE_MODES = get_args(SurrogateMode)


def fixed_params(sset: SurrogateSet, items: np.ndarray, aug, patch: int, image_size: int, pca, seed: int, tag=0):
    """The parameters of every patch of a fixed surrogate set (``method.surrogate=fixed``), drawn
    once from ``(seed, 23, tag)``: the same run seed (a resumed run included) gives the same set."""
    rng = np.random.default_rng([seed, 23, int(tag)])
    return draw_params(rng, sset.anchors[items], aug, patch, image_size, pca)


def surrogate_recipe(
    sset: SurrogateSet,
    aug,
    patch: int,
    image_size: int,
    pca,
    per_class: int,
    surrogate: str = "per_epoch",
    tag: int = 0,
) -> Recipe:
    """Exemplar-CNN's recipe: ``per_class`` patches of every class per epoch, its own plan;
    ``surrogate``: ``per_epoch`` (new parameters every step) or ``fixed`` (one set, drawn once)."""
    choice(surrogate, "method.surrogate", SURROGATE_MODES)
    items = sset.items(per_class)
    cache = {}

    def plan(seed, epoch, rank, world, batch_size):
        fixed = None
        if surrogate == "fixed":
            if seed not in cache:
                cache[seed] = fixed_params(sset, items, aug, patch, image_size, pca, seed, tag)
            fixed = cache[seed]
        return SurrogatePlan(items, sset, aug, patch, image_size, pca, batch_size, seed, epoch, rank, world, fixed)

    return patch_recipe(patch, aug, plan=plan, items=len(items))


def generate_torch(images: torch.Tensor, params: PatchParams, patch: int, aug=None) -> torch.Tensor:
    """(n, 3, H, W) uint8 source images (one per patch) -> (n, patch, patch, 3) uint8 patches, by
    the ops' torch faces (the validation patches and the tests' reference)."""
    step = ViewPlan(np.arange(len(images)), param_fields(params), len(images))
    return run_torch(patch_recipe(patch, aug), images, step, ViewContext(patch))[0]
