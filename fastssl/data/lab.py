"""Colour on device: sRGB -> CIE-Lab and split-channel quantised targets (Split-Brain).

The conversion is the standard one (sRGB, D65 white, 2-degree observer; the same constants as
``skimage.color.rgb2lab``):

    linear  = ((c + 0.055) / 1.055) ** 2.4       if c > 0.04045 else c / 12.92     (c in [0, 1])
    xyz     = M_rgb->xyz @ linear / white_D65
    f(t)    = cbrt(t)                             if t > 0.008856 else 7.787 t + 16/116
    L, a, b = 116 f(y) - 16,  500 (f(x) - f(y)),  200 (f(y) - f(z))

It is written twice with the same maths: as a DALI graph (``ColorSplit.dali``: a 256-entry
``fn.lookup_table`` for the sRGB curve of the byte values, two ``fn.coord_transform`` 3x3
matrices, arithmetic and ``math.cbrt``; no CPU callback; it
runs on DALI's GPU or CPU backend) and in torch (``ColorSplit.torch``: the DataLoader
baseline and the evaluation protocols, which see whole images).  Tests compare both with
scikit-image.

Targets.  The channels are split in two groups, (L | ab) or (R | GB).  The group of one channel
is quantised into ``bins1`` bins, the group of two jointly into ``bins2 x bins2`` bins, over the
fixed range of the space (L 0..100, a and b ``ab_range``; RGB 0..255) or, with ``rescale``
("re-scaled Lab"), over each image's own min..max of each channel.  Targets are downsampled
before quantising: each target cell is the bin of the *mean colour of its block* (a
``factor x factor`` box average, exact and aliasing-free for the integer factor the config
requires); the mean colour is what a prediction at that coarse resolution can be asked for, and
the per-image range is taken at full resolution so that rescaled bins span the image's real
extremes.

ab classes (``ab_bins``).  ``seed100`` (the default) is the joint ``bins2 x bins2`` grid above, as
the Split-Brain paper's text has it; only 63 of its 100 classes are reached by any sRGB colour
(measured over all 256^3 colours, tests/test_splitbrain_authors.py).  ``grid313`` is the class
set of the colourisation code of Zhang, Isola & Efros (github.com/richzhang/colorization,
``resources/pts_in_hull.npy``, loaded by ``NNEncode`` in ``resources/caffe_traininglayers.py``):
the 313 centres of a 10-unit ab grid that lie in the gamut (``GRID313``, below, transcribed as
the per-a range of b values; its order is theirs).  In that mode the pipeline does *not*
quantise ab: the ab targets are the block-mean a and b themselves, a (2, h, w) float32 map, and
the soft encoding and the class rebalancing run in the method's loss on the training device
(``fastssl/methods/splitbrain/encoding.py``).  The pipeline stays one
block mean for both modes, its DALI and torch faces stay one formula each, and the 313-way
nearest-neighbour search (313 distances per target cell) is a small batched GPU op instead of a
DALI graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Tuple, get_args

import numpy as np
import torch

# sRGB (linear) -> XYZ, D65 reference white: as skimage.color
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_XYZ_NORM = _RGB_TO_XYZ / _WHITE_D65[:, None]  # XYZ already divided by the white point
_F_TO_LAB = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_F_TO_LAB_T = np.array([-16.0, 0.0, 0.0])
_EPS_GAMMA, _EPS_F = 0.04045, 0.008856
Space = Literal["lab", "rgb"]  # the config fields' types (Split-Brain's method.space, method.ab_bins)
AbBins = Literal["seed100", "grid313"]
SPACES = get_args(Space)
AB_BINS = get_args(AbBins)

# The 313 in-gamut ab bin centres of the colourisation code (Zhang, Isola, Efros, "Colorful Image
# Colorization", ECCV 2016): github.com/richzhang/colorization, resources/pts_in_hull.npy, 313 x 2
# int64 (a, b) sorted by a then b.  Written here as a -> (lowest b, highest b),
# every b between them on the 10-unit grid; the expansion equals their file value for value (as
# also listed by OpenCV's samples/dnn/colorization.cpp, ``hull_pts``).
_GRID313_B_RANGES = {
    -90: (50, 90),
    -80: (20, 90),
    -70: (0, 90),
    -60: (-20, 90),
    -50: (-30, 100),
    -40: (-40, 100),
    -30: (-50, 100),
    -20: (-50, 100),
    -10: (-60, 100),
    0: (-70, 100),
    10: (-80, 90),
    20: (-80, 90),
    30: (-90, 90),
    40: (-100, 90),
    50: (-100, 80),
    60: (-110, 80),
    70: (-110, 80),
    80: (-110, 70),
    90: (-110, 70),
    100: (-90, 0),
}
GRID313 = np.array(
    [(a, b) for a, (lo, hi) in _GRID313_B_RANGES.items() for b in range(lo, hi + 1, 10)], dtype=np.float64
)  # (313, 2)
assert GRID313.shape == (313, 2)


@dataclass(frozen=True)
class ColorSplit:
    """One view -> (network input, targets of group 1, targets of group 2).

    space: 'lab' (L | ab) or 'rgb' (R | GB);  bins1: bins of the one-channel group;
    bins2: bins per channel of the two-channel group (joint classes = bins2 ** 2);
    rescale: per-image min..max ranges;  factor: target downsampling (view side / target side).
    """

    space: str = "lab"
    bins1: int = 100
    bins2: int = 10
    rescale: bool = False
    factor: int = 8
    ab_range: Tuple[float, float] = (-110.0, 110.0)
    ab_bins: str = "seed100"  # seed100: bins2 x bins2 joint bins | grid313: targets 2 = block-mean (a, b)

    num_outputs = 3  # per view: input, targets of group 1, targets of group 2

    @property
    def soft_ab(self) -> bool:
        """Targets of group 2 are the continuous block-mean ab (grid313), soft-encoded in the loss."""
        return self.ab_bins == "grid313"

    @property
    def classes(self) -> Tuple[int, int]:
        return self.bins1, (len(GRID313) if self.soft_ab else self.bins2**2)

    def fixed_range(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per channel of the space's fixed range."""
        if self.space == "lab":
            return np.array([0.0, *[self.ab_range[0]] * 2]), np.array([100.0, *[self.ab_range[1]] * 2])
        return np.zeros(3), np.full(3, 255.0)

    def input_scale(self) -> Tuple[List[float], List[float]]:
        """Per-channel (centre, half-width) that map the space to about [-1, 1] for the network."""
        lo, hi = self.fixed_range()
        return ((lo + hi) / 2).tolist(), ((hi - lo) / 2).tolist()

    # ------------------------------------------------------------------ DALI

    def dali(self, x, side: int):
        """DALI graph: HWC uint8 view of ``side`` px -> [CHW float input, (h, w) int32 targets 1,
        targets 2 ((h, w) int32; grid313: (2, h, w) float32 block-mean a, b)]."""
        return self.dali_targets(dali_colour(x, self.space), side)

    def dali_targets(self, c, side: int):
        """The same from a view already in the space's units (``dali_colour``)."""
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath

        centre, half = self.input_scale()
        inp = fn.transpose((c - np.float32(centre)) * np.float32(1 / np.array(half)), perm=[2, 0, 1])
        if self.rescale:
            lo = fn.reductions.min(c, axes=[0, 1])
            inv = 1.0 / (fn.reductions.max(c, axes=[0, 1]) - lo + np.float32(1e-6))
        else:
            lo, hi = self.fixed_range()
            lo, inv = lo.astype(np.float32), (1.0 / (hi - lo)).astype(np.float32)
        f, t = self.factor, side // self.factor
        small = fn.reductions.mean(fn.reshape(c, shape=[t, f, t, f, 3]), axes=[1, 3])  # block means
        n = np.array([self.bins1, self.bins2, self.bins2], np.float32)
        q = dmath.min(dmath.max(dmath.floor((small - lo) * inv * n), np.float32(0)), n - 1)
        t1 = fn.cast(q[:, :, 0], dtype=types.INT32)
        if self.soft_ab:
            return [inp, t1, fn.transpose(small[:, :, 1:3], perm=[2, 0, 1])]
        t2 = fn.cast(q[:, :, 1] * self.bins2 + q[:, :, 2], dtype=types.INT32)
        return [inp, t1, t2]

    # ------------------------------------------------------------------ torch

    def torch(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The same for a (B, 3, H, W) or (3, H, W) uint8 tensor: [input, targets 1, targets 2]."""
        batched = x.dim() == 4
        out = self.torch_targets(torch_colour(x if batched else x[None], self.space))
        return out if batched else [o[0] for o in out]

    def torch_targets(self, c: torch.Tensor) -> List[torch.Tensor]:
        """The same from a (B, 3, H, W) batch already in the space's units (``torch_colour``)."""
        inp = self.normalise(c)
        if self.rescale:
            lo = c.amin(dim=(2, 3), keepdim=True)
            inv = 1.0 / (c.amax(dim=(2, 3), keepdim=True) - lo + 1e-6)
        else:
            lo, hi = self.fixed_range()
            lo, inv = (
                torch.tensor(v, dtype=torch.float32, device=c.device).view(1, 3, 1, 1) for v in (lo, 1.0 / (hi - lo))
            )
        small = torch.nn.functional.avg_pool2d(c, self.factor)  # block means
        n = torch.tensor([self.bins1, self.bins2, self.bins2], dtype=torch.float32, device=c.device).view(1, 3, 1, 1)
        q = torch.minimum(torch.floor((small - lo) * inv * n).clamp_min(0), n - 1).long()
        if self.soft_ab:
            return [inp, q[:, 0].int(), small[:, 1:3].contiguous()]
        t1, t2 = q[:, 0], q[:, 1] * self.bins2 + q[:, 2]
        return [inp, t1.int(), t2.int()]

    def normalise(self, c: torch.Tensor) -> torch.Tensor:
        centre, half = self.input_scale()
        centre = torch.tensor(centre, dtype=c.dtype, device=c.device).view(1, 3, 1, 1)
        inv = torch.tensor(1 / np.array(half), dtype=c.dtype, device=c.device).view(1, 3, 1, 1)
        return (c - centre) * inv

    def bin_centres(self) -> Tuple[np.ndarray, np.ndarray]:
        """Colour values at the centre of each class of the two groups over the fixed range:
        (bins1,) values of channel 0 and (bins2 ** 2, 2) values of channels 1, 2 (grid313: the
        (313, 2) ``GRID313``)."""
        lo, hi = self.fixed_range()
        c0 = lo[0] + (np.arange(self.bins1) + 0.5) * (hi[0] - lo[0]) / self.bins1
        if self.soft_ab:
            return c0, GRID313.copy()
        i, j = np.divmod(np.arange(self.bins2**2), self.bins2)
        c12 = np.stack(
            [lo[1] + (i + 0.5) * (hi[1] - lo[1]) / self.bins2, lo[2] + (j + 0.5) * (hi[2] - lo[2]) / self.bins2], 1
        )
        return c0, c12


def srgb_linear_table() -> np.ndarray:
    """Linear-light value of each of the 256 sRGB byte values (the gamma branch above)."""
    c = np.arange(256) / 255.0
    return np.where(c > _EPS_GAMMA, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


def dali_colour(x, space: str):
    """HWC uint8 DALI node -> HWC float32 in the space's units (Lab, or RGB 0..255).  The sRGB
    linearisation of a byte is a 256-entry ``fn.lookup_table`` (exact, and 5x faster than
    ``math.pow`` on the CPU backend)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    if space == "rgb":
        return fn.cast(x, dtype=types.FLOAT)
    lin = fn.lookup_table(
        x, keys=list(range(256)), values=srgb_linear_table().astype(np.float32).tolist(), dtype=types.FLOAT
    )
    xyz = fn.coord_transform(lin, M=_XYZ_NORM.astype(np.float32).ravel().tolist())
    cube = xyz > np.float32(_EPS_F)
    f = cube * dmath.cbrt(xyz) + (1 - cube) * (xyz * np.float32(7.787) + np.float32(16 / 116))
    return fn.coord_transform(f, M=_F_TO_LAB.ravel().tolist(), T=_F_TO_LAB_T.tolist())


def torch_colour(x: torch.Tensor, space: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 in the space's units (Lab, or RGB 0..255)."""
    x = x.float()
    if space == "rgb":
        return x
    return rgb_to_lab(x / 255.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE-Lab (D65), as skimage.color.rgb2lab."""
    lin = torch.where(rgb > _EPS_GAMMA, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_XYZ_NORM, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    f = torch.where(xyz > _EPS_F, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    m2 = torch.tensor(_F_TO_LAB, dtype=rgb.dtype, device=rgb.device)
    t = torch.tensor(_F_TO_LAB_T, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return torch.einsum("ij,bjhw->bihw", m2, f) + t


# ---------------------------------------------------------------------- grid313: the loss's maths
