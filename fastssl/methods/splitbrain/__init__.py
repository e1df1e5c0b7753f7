"""Split-Brain autoencoder (Zhang, Isola, Efros 2017).

Each image (a random crop of it, optionally flipped) is converted to CIE-Lab *inside the data
pipeline* (DALI, on the GPU by default: fastssl/data/lab.py) and split into L and ab.  One
fully convolutional half of the network sees only L and predicts the image's quantised ab
(10 x 10 joint bins), the other sees only ab and predicts quantised L (100 bins), both on a
downsampled grid (12 x 12 for 96 px crops); the loss is the cross-entropy per target cell,
summed over the two halves.  The representation is both halves' activations concatenated
(``SplitBackbone``).  Options: "re-scaled Lab" (bins over each image's own per-channel range)
and the RGB split (R -> GB, GB -> R).

ab classes (``method.ab_bins``).  ``seed100`` (default) is the 10 x 10 grid of the paper's text.
``grid313`` takes the L -> ab half's classes, targets and loss from the colourisation code the
paper builds on (github.com/richzhang/colorization, resources/caffe_traininglayers.py and
models/colorization_train_val_v2.prototxt; Split-Brain's own training code is not public):

* classes: the 313 in-gamut centres of a 10-unit ab grid (``fastssl.data.lab.GRID313``, their
  pts_in_hull.npy); the L half's head has 313 outputs;
* soft targets: each target cell's ab spread over its 10 nearest centres with Gaussian weights,
  sigma 5, normalised (their NNEncode); the loss is the cross-entropy against that distribution,
  sum_k -q_k log softmax(z)_k;
* class rebalancing: the cell's cross-entropy is weighted by ``w`` of its nearest bin, w =
  ((1 - 0.5) p + 0.5 / Q) ** -1 renormalised so that E_p[w] = 1 (their PriorFactor, lambda 0.5,
  alpha 1), times 0 for a grey image (no |a| or |b| above 5: their NonGrayMask).  Their code
  scales the gradient by w (ClassRebalanceMult) and reports the unweighted loss; here the
  weighted mean over cells *is* the loss, so the gradients are theirs and ``loss_to_ab`` is the
  weighted value.
* prior p: their file (ImageNet's, resources/prior_probs.npy) could not be obtained (the one
  redistributed copy found, in nilboy/colorization-tf, is not it: its mass sits on the gamut's
  corners), so p is computed from the training images' own empirical distribution, as the
  colourisation paper defines it (ECCV 2016, Sec. 2.2: the ab distribution smoothed with a
  Gaussian of sigma 5): the mean soft encoding of the block-mean ab of up to ``PRIOR_IMAGES``
  whole pre-training images (evenly spaced), at the targets' block size, at the start of a run.
  It is a buffer (``ab_prior``): saved in checkpoints, reused on resume.

Design: the pipeline does not soft-encode.  In grid313 mode its ab targets are the block-mean a
and b of each target cell ((2, h, w) float32, the same block mean that seed100 quantises), and
the 313-way nearest-neighbour search, the Gaussian weights and the rebalancing run in the loss on
the training device (a (cells x 313) distance matrix and a top-10: cheap there, and no 313-channel
float map crosses the pipeline).  The DALI and torch faces stay one block mean each and agree to
float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.data.lab import GRID313, AbBins, ColorSplit, Space, torch_colour
from fastssl.data.ops import Crop, Flip, SplitTargets, ToSpace
from fastssl.data.plan import square_crops
from fastssl.data.recipe import Recipe
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig
from fastssl.methods.splitbrain import encoding


@dataclass
class SplitBrainConfig(MethodConfig):
    name: str = "splitbrain"
    space: Space = "lab"  # lab (L | ab) | rgb (R | GB)
    rescale: bool = False  # "re-scaled Lab": bins span each image's own min..max per channel
    bins_l: int = 100  # bins of the one-channel group (L, or R)
    bins_ab: int = 10  # bins per channel of the two-channel group (ab, or GB): bins_ab ** 2 classes
    ab_range: List[float] = field(default_factory=lambda: [-110.0, 110.0])  # fixed range of a and b
    crop_size: Optional[int] = None  # random square crop side; None = the whole image
    target_size: Optional[int] = None  # side of the target grid; None = crop_size / 8
    flip: bool = True  # random horizontal flip
    ab_bins: AbBins = "seed100"  # seed100: bins_ab x bins_ab (the paper's text) | grid313: the colourisation code's


PRIOR_IMAGES = 10000  # grid313: pre-training images (evenly spaced) the ab prior is measured on


@register
class SplitBrain(Method):
    name = "splitbrain"
    Config = SplitBrainConfig
    tool_order = 3
    benchmarks = ("pipelines", "train_step")  # (not in the tiny run: its Lab targets make it the slowest)

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        self.split = self.color_split(cfg, image_size)
        c1, c2 = self.split.classes
        last = backbone.stage_names[-1]
        # half 0 sees the one-channel group and predicts the other group's classes, and vice versa
        self.heads = nn.ModuleList(
            [nn.Conv2d(backbone.halves[0].widths[last], c2, 1), nn.Conv2d(backbone.halves[1].widths[last], c1, 1)]
        )
        if self.split.soft_ab:
            self.register_buffer("ab_centres", torch.tensor(GRID313, dtype=torch.float32), persistent=False)
            self.register_buffer("ab_prior", torch.zeros(len(GRID313), dtype=torch.float64))  # set by begin_stage
        self._prior_checked = False

    def begin_stage(self, stage: int, source=None) -> None:
        if self.split.soft_ab and source is not None and not bool(self.ab_prior.sum() > 0):
            self.ab_prior.copy_(self.measure_prior(source.pretrain))  # (a resumed run has it from the checkpoint)

    def measure_prior(self, split, max_images: int = PRIOR_IMAGES, chunk: int = 256) -> torch.Tensor:
        """The ab prior (313,) of a split: the mean soft encoding of the block-mean ab of up to
        ``max_images`` whole images (evenly spaced; the same on every rank)."""
        from fastssl.data.decode import split_images

        n = len(split)
        index = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
        f = self.split.factor

        def points():
            for i in range(0, len(index), chunk):
                c = torch_colour(split_images(split, index[i : i + chunk], self.image_size), "lab")
                yield F.avg_pool2d(c[:, 1:3], f).permute(0, 2, 3, 1).reshape(-1, 2)

        return encoding.empirical_prior(points(), self.ab_centres.cpu())

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
        return ColorSplit(m.space, m.bins_l, m.bins_ab, m.rescale, factor, tuple(m.ab_range), m.ab_bins)

    @classmethod
    def validate(cls, cfg, data_info):
        from fastssl.errors import ConfigError

        m, size = cfg.method, data_info["image_size"]
        if not cfg.model.arch.startswith("split-"):
            raise ConfigError(
                f"model.arch: splitbrain needs a split network (split-simplenet or split-resnet18), got {cfg.model.arch!r}"
            )
        if m.bins_l < 2 or m.bins_ab < 2:
            raise ConfigError(f"method.bins_l/bins_ab: need >= 2 bins, got {m.bins_l} and {m.bins_ab}")
        if len(m.ab_range) != 2 or not m.ab_range[0] < m.ab_range[1]:
            raise ConfigError(f"method.ab_range: must be [lo, hi] with lo < hi, got {list(m.ab_range)}")
        if m.ab_bins == "grid313" and (m.space != "lab" or m.rescale):
            raise ConfigError(
                "method.ab_bins: grid313 is a fixed grid of CIE-Lab ab values; it needs "
                f"method.space=lab and method.rescale=false (got {m.space!r}, {m.rescale})"
            )
        crop = cls.crop_side(m, size)
        if not 8 <= crop <= size:
            raise ConfigError(
                f"method.crop_size: {crop} px is impossible for {size}x{size} images (need 8 <= crop <= {size})"
            )
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

    @classmethod
    def input_spec(cls, cfg, stats=None):
        from omegaconf import OmegaConf

        return {
            "pixels": f"colour split of method.space={OmegaConf.select(cfg, 'method.space')}",
            "note": "see fastssl.methods.splitbrain eval_input",
        }

    def predict(self, x: torch.Tensor):
        """Logits of both halves: (half 0 -> group-2 classes, half 1 -> group-1 classes)."""
        b, last = self.backbone, self.backbone.stage_names[-1]
        a = b.halves[0](x[:, : b.split], [last])[last]
        c = b.halves[1](x[:, b.split :], [last])[last]
        return self.heads[0](a), self.heads[1](c)

    def forward(self, views, index):
        x, t1, t2 = views
        soft = self.split.soft_ab
        t1, t2 = t1.long(), (t2.float() if soft else t2.long())
        p2, p1 = self.predict(x)
        if p2.shape[-2:] != t2.shape[-2:]:  # nets whose output grid differs from the targets'
            p2 = F.interpolate(p2, size=t2.shape[-2:], mode="bilinear", align_corners=False)
            p1 = F.interpolate(p1, size=t1.shape[-2:], mode="bilinear", align_corners=False)
        if soft:
            loss2 = self.soft_ab_loss(p2.float(), t2)
        else:
            loss2 = F.cross_entropy(p2.float(), t2)  # one-channel half (L) -> ab
        loss1 = F.cross_entropy(p1.float(), t1)  # two-channel half (ab) -> L
        return {"loss": loss1 + loss2, "loss_to_ab": loss2.detach(), "loss_to_l": loss1.detach()}

    def soft_ab_loss(self, logits: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """grid313: (B, 313, h, w) logits, (B, 2, h, w) block-mean ab -> the mean over cells of the
        rebalancing weight times the cross-entropy against the soft target (see the module doc)."""
        if not self._prior_checked:  # (once: the check waits for the device)
            if not bool(self.ab_prior.sum() > 0):
                raise RuntimeError(
                    "splitbrain grid313: the ab prior is not set; begin_stage(0, source) measures "
                    "it (fastssl/train.py calls it before the first step)"
                )
            self._prior_checked = True
        b, q, h, w = logits.shape
        logp = F.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, q)
        with torch.no_grad():
            wts, idx = encoding.soft_encode(ab.permute(0, 2, 3, 1).reshape(-1, 2), self.ab_centres)
            boost = encoding.prior_factor(self.ab_prior).float()[idx[:, 0]]  # the weight of each cell's nearest bin
            boost = boost * encoding.nongray_mask(ab).repeat_interleave(h * w)
        ce = -(wts * logp.gather(1, idx)).sum(1)
        return (boost * ce).mean()
