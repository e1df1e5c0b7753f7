"""Exemplar-CNN's patch ops (Dosovitskiy et al. 2016): one affine warp of the seed image to the
patch (translation, scale, rotation), one colour matrix (the PCA contrast), and the exact
RGB -> HSV -> adjusted -> RGB round trip (saturation/value powers, factors, offsets; hue shift).
The parameters are drawn per patch on the host (``methods/exemplar/surrogate.py``); both faces leave the
patch as HWC uint8 (the layout of a materialised set), rounded half up the same way.

The authors' variants (``EricArazo/ExemplarCNN``, ``transformations.py``): ``ColourMatrix(per_patch=True)``
fits the PCA to each patch's own pixels (torch face only: a DALI graph has no eigensolver, and
``ExemplarCNN.validate`` refuses it on the DALI pipelines), ``HSVPower(stretch=True)`` stretches
the patch to [0, 1] by its own minimum and maximum before and after the HSV round trip and does
not clip saturation and value (both faces).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fastssl.data.ops.base import Op, ViewContext


class WarpAffine(Op):
    """``affine`` (2, 3): output pixel (x, y, 1) -> source (x, y) in pixel-centre coordinates;
    bilinear, border pixels repeat (DALI ``fn.warp_affine`` with the matrix as its input;
    torch ``grid_sample``).  Float output, ``patch`` x ``patch``."""

    reads = ("affine",)

    def __init__(self, patch: int):
        self.patch = int(patch)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        m = (
            f["affine"].gpu() if ctx.device == "gpu" else f["affine"]
        )  # an input, not a named argument: may be on the GPU
        return fn.warp_affine(
            x, m, size=(self.patch, self.patch), inverse_map=True, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT
        )  # no fill_value: border repeats

    def torch(self, x, f, ctx: ViewContext):
        n, _, h, w = x.shape
        dev, p = x.device, self.patch
        aff = f["affine"].to(dev).double()
        ys, xs = torch.meshgrid(
            torch.arange(p, device=dev, dtype=torch.float64) + 0.5,
            torch.arange(p, device=dev, dtype=torch.float64) + 0.5,
            indexing="ij",
        )
        pts = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (P, P, 3): x, y, 1
        src = torch.einsum("nij,yxj->nyxi", aff, pts)  # source (x, y), pixel-centre coordinates
        grid = torch.stack([src[..., 0] * (2.0 / w) - 1, src[..., 1] * (2.0 / h) - 1], -1).float()
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self) -> str:
        return f"WarpAffine({self.patch})"


class ColourMatrix(Op):
    """``cmat`` (3, 3) @ RGB + ``coff`` (3,), on the 0..255 scale (DALI ``fn.coord_transform``
    with both as CPU named arguments; torch einsum).  ``per_patch``: the authors' PCA of each
    patch's own pixels, the projections on its components (largest first) multiplied by ``pcaf``
    (3,) (``patch_pca``; torch face only)."""

    def __init__(self, per_patch: bool = False):
        self.per_patch = bool(per_patch)
        self.reads = ("pcaf",) if self.per_patch else ("cmat", "coff")

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn

        if self.per_patch:
            from fastssl.errors import ConfigError

            raise ConfigError(
                f"method.aug.pca_basis: patch has no DALI face (data.pipeline=dali-{ctx.device}); "
                "use data.pipeline=torch or data.pipeline=tensor"
            )
        return fn.coord_transform(x, M=f["cmat"], T=f["coff"])  # named argument inputs: DALI wants them on the CPU

    def torch(self, x, f, ctx: ViewContext):
        n = len(x)
        if self.per_patch:
            return patch_pca(x, f["pcaf"].to(x.device))
        return torch.einsum("nij,njyx->niyx", f["cmat"].to(x.device), x) + f["coff"].to(x.device).view(n, 3, 1, 1)

    def __repr__(self) -> str:
        return "ColourMatrix(per_patch)" if self.per_patch else "ColourMatrix"


def patch_pca(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) 0..255 -> the same with each patch's pixels (on [0, 1]) projected on their own
    principal components (largest eigenvalue first), multiplied by ``factors`` (n, 3) and
    projected back: U diag(f) U^T (x - mean) + mean, in float64.  As the authors'
    ``PCA_rand_always`` (before its stretch), ``mean`` is their ``X.mean(axis=0)`` of the HWC
    patch: one mean per column and channel, not one per channel."""
    n, c, h, w = x.shape
    px = x.double() / 255.0
    mean = px.mean(2, keepdim=True)  # (n, 3, 1, W): over the rows, as numpy's axis 0 of HWC
    d = (px - mean).reshape(n, c, h * w)
    _, vecs = torch.linalg.eigh(d @ d.transpose(1, 2))  # ascending eigenvalues
    vecs = vecs.flip(-1)  # the authors sort them descending: factor k scales the k-th largest
    m = vecs @ torch.diag_embed(factors.double()) @ vecs.transpose(1, 2)
    return (((m @ d).reshape(n, c, h, w) + mean) * 255.0).float()


def hsv_adjust(r, g, b, p, ops, clip: bool = True):
    """Exact RGB -> HSV -> adjusted -> RGB on [0, 1] channels ``r, g, b``; ``p`` indexes the 7
    parameters.  ``ops`` supplies max/min/pow/floor/clamp for torch or DALI (same expression).
    ``clip=False``: saturation and value are not clipped to [0, 1] (the authors: their stretch
    follows)."""
    v = ops.max3(r, g, b)
    c = v - ops.min3(r, g, b)
    cs = ops.maximum(c, 1e-8)
    sat = c / ops.maximum(v, 1e-8)
    is_r = ops.f(r == v)
    is_g = ops.f(g == v) * (1.0 - is_r)
    h6 = is_r * ((g - b) / cs) + is_g * ((b - r) / cs + 2.0) + (1.0 - is_r - is_g) * ((r - g) / cs + 4.0)
    h6 = h6 + 6.0 * p(6)
    sat = ops.pow(sat, p(0)) * p(1) + p(2)
    v = ops.pow(v, p(3)) * p(4) + p(5)
    if clip:
        sat, v = ops.clamp(sat, 0.0, 1.0), ops.clamp(v, 0.0, 1.0)
    out = []
    for n in (5.0, 3.0, 1.0):  # HSV -> RGB: V * (1 - S * clamp(min(k, 4 - k), 0, 1)), k = (n + H/60) mod 6
        k = n + h6
        k = k - 6.0 * ops.floor(k / 6.0)
        out.append(v * (1.0 - sat * ops.clamp(ops.minimum(k, 4.0 - k), 0.0, 1.0)))
    return out


_TORCH_OPS = SimpleNamespace(
    max3=lambda r, g, b: torch.maximum(torch.maximum(r, g), b),
    min3=lambda r, g, b: torch.minimum(torch.minimum(r, g), b),
    maximum=lambda x, y: torch.clamp(x, min=y),
    minimum=torch.minimum,
    pow=torch.pow,
    floor=torch.floor,
    clamp=torch.clamp,
    f=lambda m: m.float(),
)


def _dali_ops():
    """The ``ops`` of ``hsv_adjust`` for a DALI graph (nvidia.dali.math; bools cast by arithmetic)."""
    import nvidia.dali.math as dm

    return SimpleNamespace(
        max3=lambda r, g, b: dm.max(dm.max(r, g), b),
        min3=lambda r, g, b: dm.min(dm.min(r, g), b),
        maximum=dm.max,
        minimum=dm.min,
        pow=dm.pow,
        floor=dm.floor,
        clamp=dm.clamp,
        f=lambda m: m * 1.0,
    )


def _to_uint8(x):
    """[0, 1] -> 0..255, rounded half up (floor(255 x + 0.5)), same in both faces."""
    return x * 255.0 + 0.5


STRETCH_EPS = 1e-8  # a flat patch: (x - min) / max(max - min, eps) stays 0 (the authors divide by 0)


def stretch_torch(x: torch.Tensor) -> torch.Tensor:
    """Each patch (dim 0) mapped to [0, 1] by its own minimum and maximum over all its values."""
    lo = x.flatten(1).min(1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = x.flatten(1).max(1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / torch.clamp(hi - lo, min=STRETCH_EPS)


def _stretch_dali(x):
    from nvidia.dali import fn
    from nvidia.dali import math as dm

    lo = fn.reductions.min(x)
    return (x - lo) / dm.max(fn.reductions.max(x) - lo, STRETCH_EPS)


class HSVPower(Op):
    """``hsvp`` (7,): saturation power, factor, offset; value power, factor, offset; hue shift
    (fraction of the circle).  0..255 float in, HWC uint8 patch out (ends the recipe).
    ``stretch``: the input (after the PCA contrast) and the output stretched to [0, 1] by the
    patch's own min and max instead of clipped, S and V unclipped (the authors' post-processing)."""

    reads = ("hsvp",)

    def __init__(self, stretch: bool = False):
        self.stretch = bool(stretch)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types
        from nvidia.dali import math as dm

        hsv = f["hsvp"].gpu() if ctx.device == "gpu" else f["hsvp"]  # feeds arithmetic: may live on the GPU
        x = _stretch_dali(x) if self.stretch else dm.clamp(x / 255.0, 0.0, 1.0)
        out = hsv_adjust(x[:, :, 0], x[:, :, 1], x[:, :, 2], lambda i: hsv[i], _dali_ops(), clip=not self.stretch)
        y = fn.stack(*out, axis=2)
        y = _stretch_dali(y) if self.stretch else y
        y = dm.clamp(dm.floor(_to_uint8(y)), 0.0, 255.0)
        return fn.cast(y, dtype=types.UINT8)

    def torch(self, x, f, ctx: ViewContext):
        n = len(x)
        x = stretch_torch(x) if self.stretch else (x / 255.0).clamp(0.0, 1.0)
        hp = f["hsvp"].to(x.device)
        out = hsv_adjust(x[:, 0], x[:, 1], x[:, 2], lambda i: hp[:, i].view(n, 1, 1), _TORCH_OPS, clip=not self.stretch)
        y = torch.stack(out, -1)
        y = stretch_torch(y) if self.stretch else y
        return torch.floor(_to_uint8(y)).clamp(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return "HSVPower(stretch)" if self.stretch else "HSVPower"
