"""Augmentation ops: each one class with a DALI face and a torch face (``ops/base.py``)."""

from fastssl.data.ops.base import Op, ViewContext
from fastssl.data.ops.blur import Blur
from fastssl.data.ops.colour import HSV, Grey, Normalise, hsv_matrix
from fastssl.data.ops.geometry import Crop, Flip, Resize
from fastssl.data.ops.lab import SplitTargets, ToSpace

__all__ = [
    "Op",
    "ViewContext",
    "Crop",
    "Resize",
    "Flip",
    "HSV",
    "Grey",
    "Blur",
    "Normalise",
    "ToSpace",
    "SplitTargets",
    "hsv_matrix",
]
