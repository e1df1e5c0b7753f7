"""Geometric ops: crop a planned box, resize to the view size, horizontal flip."""

from __future__ import annotations

import torch

from fastssl.data.ops.base import Op, ViewContext, is_ragged


class Crop(Op):
    """The planned box ``box`` = (y, x, h, w) in image pixels.  DALI ``fn.slice``; torch indexing."""

    reads = ("box",)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn

        box = f["box"]
        return fn.slice(x, box[0:2], box[2:4], axis_names="HW")  # anchor (y, x), shape (h, w)

    def torch(self, x, f, ctx: ViewContext):
        box = f["box"]
        if is_ragged(x):  # whole images of different sizes (folders): one box from each
            return [img[:, y : y + h, xx : xx + w] for img, (y, xx, h, w) in zip(x, box.tolist())]
        if len(box) and bool((box[:, 2:] == box[:1, 2:]).all()):  # one size: one gather for the batch
            h, w = int(box[0, 2]), int(box[0, 3])
            b = box.to(x.device, torch.long)
            ys = (b[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]
            xs = (b[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]
            rows = torch.arange(len(b), device=x.device)[:, None, None]
            return x[rows, :, ys, xs].permute(0, 3, 1, 2).contiguous()  # (B, h, w, C) -> (B, C, h, w)
        return [x[j, :, y : y + h, xx : xx + w] for j, (y, xx, h, w) in enumerate(box.tolist())]


class Resize(Op):
    """To ``ctx.size`` x ``ctx.size``, antialiased (DALI ``fn.resize``; torchvision ``resize``)."""

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn

        return fn.resize(x, size=(ctx.size, ctx.size), antialias=True)

    def torch(self, x, f, ctx: ViewContext):
        import torchvision.transforms.v2.functional as TF

        size = [ctx.size, ctx.size]
        if is_ragged(x):
            return torch.stack([TF.resize(v, size, antialias=True) for v in x])
        return TF.resize(x, size, antialias=True)


class Flip(Op):
    """Horizontal flip where the plan's ``flip`` is 1 (DALI ``fn.flip``; ``torch.flip``)."""

    reads = ("flip",)

    def dali(self, x, f, ctx: ViewContext):
        from nvidia.dali import fn

        return fn.flip(x, horizontal=f["flip"])

    def torch(self, x, f, ctx: ViewContext):
        flip = f["flip"].bool()
        if is_ragged(x):
            return [v.flip(-1) if s else v for v, s in zip(x, flip.tolist())]
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
