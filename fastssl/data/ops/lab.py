"""Colour-space ops of Split-Brain: RGB -> the split's space (CIE-Lab or RGB), then the network
input and the two quantised target maps (the maths and its DALI/torch code: ``data/lab.py``)."""

from __future__ import annotations

from fastssl.data.lab import ColorSplit, dali_colour, torch_colour
from fastssl.data.ops.base import Op, ViewContext, refuse_ragged


class ToSpace(Op):
    """uint8 RGB -> float in ``space``'s units (Lab: L 0..100, a/b; or RGB 0..255)."""

    def __init__(self, space: str):
        self.space = space

    def dali(self, x, f, ctx: ViewContext):
        return dali_colour(x, self.space)

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        return torch_colour(x, self.space)

    def __repr__(self) -> str:
        return f"ToSpace({self.space!r})"


class SplitTargets(Op):
    """A view in the split's space -> [network input (CHW float), targets of group 1 (h, w)
    int32, targets of group 2 ((h, w) int32; with ``ab_bins='grid313'`` the (2, h, w) float32
    block-mean a and b, which the method's loss soft-encodes)]; ends the recipe."""

    num_outputs = 3

    def __init__(self, split: ColorSplit):
        self.split = split

    def dali(self, x, f, ctx: ViewContext):
        return self.split.dali_targets(x, ctx.size)

    def torch(self, x, f, ctx: ViewContext):
        refuse_ragged(self, x)
        return self.split.torch_targets(x)

    def __repr__(self) -> str:
        return f"SplitTargets({self.split})"
