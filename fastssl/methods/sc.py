"""Spatial Contrasting (Hoffer, Hubara, Ailon 2016).

Two patches are cut from every image.  For a batch of N images the features of patch 1 of
image i should be closer to patch 2 of image i than to patch 2 of any other image j:

    L = -1/N * sum_i log( exp(-||f_i1 - f_i2||) / sum_j exp(-||f_i1 - f_j2||) )

i.e. a softmax cross-entropy over negative Euclidean distances, N^2 comparisons per batch.
The loss can be applied at several stages of one network at once (each stage's feature map
is average-pooled to a vector first); the total is their weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from fastssl.data.ops import HSV, Crop, Flip, Normalise
from fastssl.data.plan import ColorJitter, check_jitter, draw_hsv, jitter_active, square_crops
from fastssl.data.recipe import Recipe
from fastssl.losses.precision import loss_input
from fastssl.losses.sc_loss import sc_loss_eager
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig


def spatial_contrasting_loss(
    f1: torch.Tensor, f2: torch.Tensor, impl: str = "eager", tf32: bool = False
) -> torch.Tensor:
    """Eq. (2) of the paper: f1, f2 are (N, D) features of the two patches of N images.
    ``impl``: eager PyTorch (fastssl/losses/sc_loss.py), or the fused Triton kernel (same value;
    fastssl/kernels/sc_loss.py, imported only here, when chosen; ``tf32``: fp32 inputs on its TF32
    tensor cores)."""
    if impl == "fused":
        from fastssl.kernels.sc_loss import sc_loss_fused

        return sc_loss_fused(f1, f2, tf32)
    return sc_loss_eager(f1, f2)


@dataclass
class SCConfig(MethodConfig):
    name: str = "sc"
    patch_size: Optional[int] = None  # pixels; None = round(patch_fraction * image side)
    patch_fraction: float = 2.0 / 3.0
    layers: Optional[List[str]] = None  # backbone stages the loss is applied at; None = last
    layer_weights: Optional[List[float]] = None  # one per layer; None = all 1
    flip: bool = False  # random horizontal flip of each patch (not in the paper)
    color: ColorJitter = field(default_factory=ColorJitter)  # per-patch colour change (not in the paper)


@register
class SpatialContrasting(Method):
    name = "sc"
    Config = SCConfig
    tool_order = 0
    benchmarks = ("pipelines", "train_step", "train_step-tiny", "compare-impls")

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        m = cfg.method
        self.layers = list(m.layers) if m.layers else [backbone.stage_names[-1]]
        self.weights = list(m.layer_weights) if m.layer_weights else [1.0] * len(self.layers)
        # stages after the deepest used one get no gradient; DDP must be told
        deepest = max(backbone.stage_names.index(s) for s in self.layers)
        self.find_unused_parameters = deepest < len(backbone.stage_names) - 1

    @staticmethod
    def patch_side(method_cfg, image_size: int) -> int:
        if method_cfg.patch_size is not None:
            return int(method_cfg.patch_size)
        return max(1, int(round(method_cfg.patch_fraction * image_size)))

    @classmethod
    def validate(cls, cfg, data_info):
        from fastssl.errors import ConfigError
        from fastssl.models import stages_of

        m, size = cfg.method, data_info["image_size"]
        if m.patch_size is None and not 0 < m.patch_fraction <= 1:
            raise ConfigError(f"method.patch_fraction: must be in (0, 1], got {m.patch_fraction}")
        p = cls.patch_side(m, size)
        if not 4 <= p <= size:
            raise ConfigError(
                f"method.patch_size: {p} px is impossible for {size}x{size} images (need 4 <= patch <= {size})"
            )
        stages = stages_of(cfg.model.arch)
        for i, s in enumerate(m.layers or []):
            if s not in stages:
                raise ConfigError(f"method.layers[{i}]: {s!r} is not a stage of {cfg.model.arch}: {', '.join(stages)}")
        check_jitter(m.color)
        if m.layer_weights is not None and len(m.layer_weights) != len(m.layers or [None]):
            raise ConfigError(
                f"method.layer_weights: {len(m.layer_weights)} weights for {len(m.layers or [None])} layers"
            )

    @property
    def view_size(self):
        return self.patch_side(self.cfg.method, self.image_size)

    def recipe(self):
        m, side, size = self.cfg.method, self.view_size, self.image_size

        def draw(
            rng, n, shapes=None
        ):  # two square patches at uniform positions (and, off by default, flips and colour)
            boxes, flips = square_crops(rng, n, 2, side, size, m.flip, shapes)
            return {"box": boxes, "flip": flips, "hsv": draw_hsv(rng, n, 2, m.color)}

        ops = [Crop()] + [Flip()] * bool(m.flip) + [HSV()] * jitter_active(m.color) + [Normalise()]
        return Recipe(draw, ops, views=2, size=side, name="sc crop")

    def forward(self, views, index):
        x = torch.cat(views, 0)  # one backbone pass over both patch sets
        feats = self.backbone(x, self.layers)
        out, total = {}, 0.0
        for name, w in zip(self.layers, self.weights):
            # pooled in fp32, then in the autocast dtype (bf16 on GPUs: the fused kernel's tensor cores)
            f1, f2 = loss_input(feats[name].float().mean(dim=(2, 3))).chunk(2)
            loss = spatial_contrasting_loss(
                f1, f2, self.loss_impl(f1, "sc_loss", B=f1.shape[0], D=f1.shape[1]), self.loss_tf32(f1)
            )
            out[f"loss_{name}"] = loss.detach()
            total = total + w * loss
        out["loss"] = total
        return out
