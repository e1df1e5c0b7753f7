"""Gaussian blur, the op that shows what adding one takes (docs/data.md walks through it).

The plan's ``blur`` field holds each view's sigma in pixels, 0 where the view is not blurred
(``plan.draw_blur``: probability and sigma range from the config).  The window is
``kernel`` x ``kernel`` pixels for every view; borders reflect without repeating the edge pixel
(DALI's default and torchvision's ``reflect``).  A sigma of 0 is run as ``1e-3``: its kernel is
exactly (0, ..., 1, ..., 0) in float32, so an unblurred view passes unchanged through both faces.
"""

from __future__ import annotations

import numpy as np
import torch

from fastssl.data.ops.base import Op, ViewContext, refuse_ragged

_TINY_SIGMA = 1e-3


class Blur(Op):
    """DALI ``fn.gaussian_blur``; torchvision ``gaussian_blur``.  Float output on the 0..255 scale."""

    reads = ("blur",)
    commutes_with_flip = True  # a symmetric kernel with symmetric borders

    def __init__(self, kernel: int):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"Blur: the window must be an odd number of pixels, got {kernel}")
        self.kernel = int(kernel)

    def feed(self, name, a):
        return np.maximum(a, np.float32(_TINY_SIGMA))  # DALI reads sigma 0 as "derive it from the window"

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn, types

        x = fn.reshape(x, layout="HWC")  # the layout only (an external source's images have none): blur H and W, not C
        return fn.gaussian_blur(x, sigma=f["blur"], window_size=self.kernel, dtype=types.FLOAT)

    def torch(self, x, f, ctx: ViewContext):
        import torchvision.transforms.v2.functional as TF

        refuse_ragged(self, x)
        x = x.float()
        k = [self.kernel, self.kernel]
        return torch.stack([TF.gaussian_blur(v, k, [max(s, _TINY_SIGMA)] * 2) for v, s in zip(x, f["blur"].tolist())])

    def __repr__(self) -> str:
        return f"Blur(kernel={self.kernel})"
