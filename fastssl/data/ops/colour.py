"""Colour ops on RGB views: HSV change, greyscale, normalisation.

HSV follows DALI's ``fn.hsv``: it works in YIQ (hue rotates I/Q, saturation scales them, value
scales all three), so the change of one view is one 3x3 RGB matrix (``hsv_matrix``), which the
torch face applies.  Greyscale is the YIQ luma Y = 0.299 R + 0.587 G + 0.114 B in all three
channels (what torchvision's ``rgb_to_grayscale`` computes), applied where the plan's ``grey``
is 1.
"""
from __future__ import annotations

import numpy as np
import torch

from fastssl.data.ops.base import Op, ViewContext, refuse_ragged

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

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        h = f["hsv"]
        return fn.hsv(x, hue=h[0], saturation=h[1], value=h[2], dtype=types.FLOAT)

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        m = torch.from_numpy(np.stack([hsv_matrix(*p) for p in f["hsv"].tolist()])).float().to(x.device)
        return torch.einsum("bij,bjhw->bihw", m, x.float())


class Grey(Op):
    """Greyscale where the plan's ``grey`` is 1: ``x + grey * (luma(x) - x)`` (float output;
    DALI ``fn.coord_transform`` with the luma matrix, arithmetic for the per-view choice)."""

    reads = ("grey",)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        x = fn.cast(x, dtype=types.FLOAT)
        y = fn.coord_transform(x, M=_LUMA.astype(np.float32).ravel().tolist(), dtype=types.FLOAT)
        g = f["grey"]
        if ctx.device == "gpu":  # an arithmetic operand, not a named argument: it may live on the GPU
            g = g.gpu()
        return x + g * (y - x)

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        x = x.float()
        y = torch.einsum("ij,bjhw->bihw", torch.from_numpy(_LUMA).float().to(x.device), x)
        g = f["grey"].float().to(x.device).view(-1, 1, 1, 1)
        return x + g * (y - x)


class Normalise(Op):
    """0..255 -> (x / 255 - mean) / std per channel, CHW float (DALI ``fn.crop_mirror_normalize``)."""

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in ctx.mean], std=[255 * s for s in ctx.std])

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        mean = torch.tensor(ctx.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(ctx.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std
