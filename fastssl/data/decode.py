"""Whole images of a split as uint8 tensors (PIL decoding for folders): what the torch executor
and the evaluation protocols read."""

from __future__ import annotations

import numpy as np
import torch

from fastssl.data.sources import Split


def load_image_file(path: str, size: int) -> torch.Tensor:
    """Decode with PIL, resize the shorter side to ``size`` and centre-crop: CHW uint8."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    with Image.open(path) as im:
        t = TF.pil_to_tensor(im.convert("RGB"))
    t = TF.resize(t, size, antialias=True)
    return TF.center_crop(t, [size, size])


def load_image_region(path: str, roi) -> torch.Tensor:
    """Decode with PIL and keep the region ``roi`` = (y, x, h, w) of the image's own pixels: CHW uint8."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    y, x, h, w = (int(v) for v in roi)
    with Image.open(path) as im:
        return TF.pil_to_tensor(im.convert("RGB").crop((x, y, x + w, y + h)))


def to_chw(images) -> torch.Tensor:
    """A list/array of HWC uint8 images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(x) for x in images])).permute(0, 3, 1, 2)


def split_images(split: Split, index, size: int) -> torch.Tensor:
    """(len(index), 3, size, size) uint8 whole images of a split (decoded with PIL for folders)."""
    if split.encoded:
        return torch.stack([load_image_file(split.files[int(i)], size) for i in index])
    return to_chw([split.images[int(i)] for i in index])
