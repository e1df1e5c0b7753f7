"""Colour ops on RGB views: HSV change, greyscale, normalisation.

HSV follows DALI's ``fn.hsv``: it works in YIQ (hue rotates I/Q, saturation scales them, value
scales all three), so the change of one view is one 3x3 RGB matrix (``hsv_matrix``), which the
torch face applies.  Greyscale is the YIQ luma Y = 0.299 R + 0.587 G + 0.114 B in all three
channels (torchvision's ``rgb_to_grayscale`` weights), applied where the plan's ``grey`` is 1.
"""

from __future__ import annotations

import numpy as np
import torch

from fastssl.data.ops.base import Op, ViewContext, refuse_ragged
from fastssl.data.ops.geometry import Flip

# RGB <-> YIQ, the colour space of DALI's fn.hsv
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_INV = np.linalg.inv(_YIQ)
_LUMA = np.repeat(_YIQ[:1], 3, axis=0)  # (3, 3): Y in every channel


def hsv_matrix(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    """The 3x3 RGB matrix of fn.hsv(hue, saturation, value)."""
    a = np.deg2rad(hue_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    return value * _YIQ_INV @ np.diag([1.0, saturation, saturation]) @ rot @ _YIQ


class HSV(Op):
    """Hue rotation (degrees), saturation and value multipliers from the plan's ``hsv`` (3,)
    per view; float output on the 0..255 scale."""

    reads = ("hsv",)
    commutes_with_flip = True

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        h = f["hsv"]
        return fn.hsv(x, hue=h[0], saturation=h[1], value=h[2], dtype=types.FLOAT)

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        m = torch.from_numpy(np.stack([hsv_matrix(*p) for p in f["hsv"].tolist()])).float().to(x.device)
        return torch.einsum("bij,bjhw->bihw", m, x.float())


class Grey(Op):
    """Greyscale where the plan's ``grey`` is 1: each view gets the luma matrix or the identity,
    chosen on the host (``feed``), and one 3x3 colour transform applies it (DALI
    ``fn.coord_transform``; torch einsum).  The identity leaves a view exactly as it was.  Float
    output on the 0..255 scale."""

    reads = ("grey",)
    commutes_with_flip = True

    @staticmethod
    def matrices(grey) -> np.ndarray:
        """(B,) flags -> (B, 3, 3) float32: luma where set, identity elsewhere."""
        g = np.asarray(grey).astype(bool).reshape(-1, 1, 1)
        return np.where(g, _LUMA, np.eye(3)).astype(np.float32)

    def feed(self, name, a):
        return self.matrices(a)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        return fn.coord_transform(x, M=f["grey"], dtype=types.FLOAT)  # per-view matrix: a CPU named argument

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        m = torch.from_numpy(self.matrices(f["grey"].numpy())).to(x.device)
        return torch.einsum("bij,bjhw->bihw", m, x.float())


class Normalise(Op):
    """0..255 -> (x / 255 - mean) / std per channel, CHW float (DALI ``fn.crop_mirror_normalize``).
    ``mirror=True`` also applies the plan's ``flip`` (what ``fuse_flip`` makes of a Flip: DALI
    then flips in the same pass)."""

    def __init__(self, mirror: bool = False):
        self.mirror = mirror
        self.reads = ("flip",) if mirror else ()

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        return fn.crop_mirror_normalize(
            x,
            dtype=types.FLOAT,
            output_layout="CHW",
            mirror=f["flip"] if self.mirror else 0,
            mean=[255 * m for m in ctx.mean],
            std=[255 * s for s in ctx.std],
        )

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        if self.mirror:
            x = Flip().torch(x, f, ctx)
        mean = torch.tensor(ctx.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(ctx.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def __repr__(self) -> str:
        return "Normalise(mirror)" if self.mirror else "Normalise"


def fuse_flip(ops):
    """A Flip followed only by ops that commute with it and a Normalise becomes that Normalise's
    mirror: the same pixels, one pass over the view fewer in DALI."""
    ops = list(ops)
    for i, op in enumerate(ops):
        if isinstance(op, Flip):
            rest = ops[i + 1 :]
            if (
                rest
                and isinstance(rest[-1], Normalise)
                and not rest[-1].mirror
                and all(o.commutes_with_flip for o in rest[:-1])
            ):
                return ops[:i] + rest[:-1] + [Normalise(mirror=True)]
    return ops
