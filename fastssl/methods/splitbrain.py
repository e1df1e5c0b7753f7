"""Split-Brain autoencoder (Zhang, Isola, Efros 2017).

Each image (a random crop of it, optionally flipped) is converted to CIE-Lab *inside the data
pipeline* (DALI, on the GPU by default: fastssl/data/lab.py) and split into L and ab.  One
fully convolutional half of the network sees only L and predicts the image's quantised ab
(10 x 10 joint bins), the other sees only ab and predicts quantised L (100 bins), both on a
downsampled grid (12 x 12 for 96 px crops); the loss is the cross-entropy per target cell,
summed over the two halves.  The representation is both halves' activations concatenated
(``SplitBackbone``).  Options: "re-scaled Lab" (bins over each image's own per-channel range)
and the RGB split (R -> GB, GB -> R).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.data.lab import SPACES, ColorSplit, torch_colour
from fastssl.data.ops import Crop, Flip, SplitTargets, ToSpace
from fastssl.data.plan import square_crops
from fastssl.data.recipe import Recipe
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig


@dataclass
class SplitBrainConfig(MethodConfig):
    name: str = "splitbrain"
    space: str = "lab"  # lab (L | ab) | rgb (R | GB)
    rescale: bool = False  # "re-scaled Lab": bins span each image's own min..max per channel
    bins_l: int = 100  # bins of the one-channel group (L, or R)
    bins_ab: int = 10  # bins per channel of the two-channel group (ab, or GB): bins_ab ** 2 classes
    ab_range: List[float] = field(default_factory=lambda: [-110.0, 110.0])  # fixed range of a and b
    crop_size: Optional[int] = None  # random square crop side; None = the whole image
    target_size: Optional[int] = None  # side of the target grid; None = crop_size / 8
    flip: bool = True  # random horizontal flip


@register
class SplitBrain(Method):
    name = "splitbrain"
    Config = SplitBrainConfig

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        self.split = self.color_split(cfg, image_size)
        c1, c2 = self.split.classes
        last = backbone.stage_names[-1]
        # half 0 sees the one-channel group and predicts the other group's classes, and vice versa
        self.heads = nn.ModuleList([nn.Conv2d(backbone.halves[0].widths[last], c2, 1),
                                    nn.Conv2d(backbone.halves[1].widths[last], c1, 1)])

    @staticmethod
    def crop_side(m, image_size: int) -> int:
        return int(m.crop_size) if m.crop_size is not None else image_size

    @classmethod
    def target_side(cls, m, image_size: int) -> int:
        return int(m.target_size) if m.target_size is not None else max(1, cls.crop_side(m, image_size) // 8)

    @classmethod
    def color_split(cls, cfg, image_size: int) -> ColorSplit:
        m = cfg.method
        factor = cls.crop_side(m, image_size) // cls.target_side(m, image_size)
        return ColorSplit(m.space, m.bins_l, m.bins_ab, m.rescale, factor, tuple(m.ab_range))

    @classmethod
    def validate(cls, cfg, data_info):
        from fastssl.config import ConfigError

        m, size = cfg.method, data_info["image_size"]
        if not cfg.model.arch.startswith("split-"):
            raise ConfigError(f"model.arch: splitbrain needs a split network (split-simplenet or split-resnet18), got {cfg.model.arch!r}")
        if m.space not in SPACES:
            raise ConfigError(f"method.space: {m.space!r} is not one of {', '.join(SPACES)}")
        if m.bins_l < 2 or m.bins_ab < 2:
            raise ConfigError(f"method.bins_l/bins_ab: need >= 2 bins, got {m.bins_l} and {m.bins_ab}")
        if len(m.ab_range) != 2 or not m.ab_range[0] < m.ab_range[1]:
            raise ConfigError(f"method.ab_range: must be [lo, hi] with lo < hi, got {list(m.ab_range)}")
        crop = cls.crop_side(m, size)
        if not 8 <= crop <= size:
            raise ConfigError(f"method.crop_size: {crop} px is impossible for {size}x{size} images (need 8 <= crop <= {size})")
        t = cls.target_side(m, size)
        if t < 1 or crop % t:
            raise ConfigError(f"method.target_size: {t} must divide the crop side {crop} (targets are block means)")

    @property
    def view_size(self):
        return self.crop_side(self.cfg.method, self.image_size)

    def recipe(self):
        m, side, size = self.cfg.method, self.view_size, self.image_size

        def draw(rng, n, shapes=None):
            boxes, flips = square_crops(rng, n, 1, side, size, m.flip, shapes)
            return {"box": boxes, "flip": flips}

        ops = [Crop(), Flip(), ToSpace(self.split.space), SplitTargets(self.split)]  # (flip: zeros when off)
        return Recipe(draw, ops, views=1, size=side, name="splitbrain crop")

    @classmethod
    def eval_input(cls, cfg, source):
        split = cls.color_split(cfg, source.image_size)
        return lambda x: split.normalise(torch_colour(x, split.space))

    def predict(self, x: torch.Tensor):
        """Logits of both halves: (half 0 -> group-2 classes, half 1 -> group-1 classes)."""
        b, last = self.backbone, self.backbone.stage_names[-1]
        a = b.halves[0](x[:, :b.split], [last])[last]
        c = b.halves[1](x[:, b.split:], [last])[last]
        return self.heads[0](a), self.heads[1](c)

    def forward(self, views, index):
        x, t1, t2 = views
        t1, t2 = t1.long(), t2.long()
        p2, p1 = self.predict(x)
        if p2.shape[-2:] != t2.shape[-2:]:  # nets whose output grid differs from the targets'
            p2 = F.interpolate(p2, size=t2.shape[-2:], mode="bilinear", align_corners=False)
            p1 = F.interpolate(p1, size=t1.shape[-2:], mode="bilinear", align_corners=False)
        loss2 = F.cross_entropy(p2.float(), t2)  # one-channel half (L) -> ab
        loss1 = F.cross_entropy(p1.float(), t1)  # two-channel half (ab) -> L
        return {"loss": loss1 + loss2, "loss_to_ab": loss2.detach(), "loss_to_l": loss1.detach()}
