"""Layer-wise contrastive learning (Zhao et al.).

From each image the pipeline cuts two adjacent, overlapping patches (anchor and positive:
the positive is the anchor shifted by at most ``max_shift`` pixels, both inside the larger
region they span) and one more patch; that last patch serves as the negative of the *next*
image in the batch, so a negative always comes from another image.  One shallow stage
(conv + ReLU + max-pool) embeds the patches; the rest of its spatial extent is max-pooled
to a vector; a triplet loss (cosine or Euclidean distance, margin, optional in-batch
hardest-negative mining) trains it.  Stages are trained one at a time: stage k freezes
stages < k and trains stage k on their output, with patches just large enough for the
receptive field of k stages (7 px for one 6x6 conv + 2x2 max-pool).  Each stage's filters
are written to ``out_dir/filters/`` when it ends, the first layer's also as a PNG grid.

The authors' code (github.com/Silent-Zebra/shallow-conv, Experiments_CIFAR100_1Layer.py) differs;
each difference is a switch here, defaults as above (docs/fidelity.md has the table):
``distance=sqeuclidean`` and ``margin=2`` (losses.py); ``mining=semihard``, their online semi-hard
selection over every patch of the other crops (utils.py, SemihardNegativeTripletSelector);
``pairs=subpatches``, one randomly placed, randomly flipped (p+1)x(p+1) crop per image whose four
p x p sub-patches (stride 1) give 6 positive pairs (networks.py, generate_patches); ``embedding=
flatten``, the stage's conv + ReLU map flattened instead of max-pooled (use_pooling=False);
``input=raw``, [0, 1] pixels instead of the dataset's standardised ones (transforms.ToTensor only).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import torch

from fastssl.data.ops import HSV, Crop, Flip, Normalise
from fastssl.data.plan import ColorJitter, check_jitter, draw_hsv, jitter_active, positions
from fastssl.data.recipe import Recipe
from fastssl.losses.precision import loss_input
from fastssl.losses.triplet import semihard_triplet_loss_eager, triplet_loss_eager
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig
from fastssl.models import shallow_min_patch


@dataclass
class LayerwiseConfig(MethodConfig):
    name: str = "layerwise"
    layers: int = 1  # stages trained, one after the other (each for train.epochs epochs)
    patch_sizes: Optional[List[int]] = None  # per stage; None = the receptive-field minimum
    max_shift: int = 2  # positive = anchor shifted by up to this many pixels (0 < shift < patch)
    distance: Literal["cosine", "euclidean", "sqeuclidean"] = (
        "cosine"  # cosine | euclidean | sqeuclidean (the authors')
    )
    margin: float = 0.5
    hardest: bool = False  # in-batch hardest-negative mining instead of the sampled negative
    mining: Literal["random", "semihard"] = (
        "random"  # random (the sampled negative) | semihard (the authors' online semi-hard selection)
    )
    pairs: Literal["one", "subpatches"] = (
        "one"  # one (anchor + shifted positive) | subpatches (4 sub-patches of a (p+1)^2 crop: 6 pairs)
    )
    embedding: Literal["maxpool", "flatten"] = (
        "maxpool"  # maxpool (the stage's output max-pooled) | flatten (conv + ReLU map, unpooled)
    )
    input: Literal["normalised", "raw"] = (
        "normalised"  # normalised (dataset mean/std) | raw ([0, 1] pixels, as the authors')
    )
    color: ColorJitter = field(default_factory=ColorJitter)  # per-patch colour change (not in the paper)


SUBPATCH_PAIRS = list(itertools.combinations(range(4), 2))  # the authors' anchor-positive pairs of one crop


class _RawPixels:
    """A data source seen with mean 0 and std 1: the loaders' Normalise op then gives x / 255."""

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, source):
        self._source = source

    def __getattr__(self, name):
        if name == "_source":
            raise AttributeError(name)
        return getattr(self._source, name)


@register
class LayerwiseContrastive(Method):
    name = "layerwise"
    Config = LayerwiseConfig
    tool_order = 1
    report_stage = True  # one stage per layer

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        self.num_stages = cfg.method.layers
        self.stage = 0
        self.begin_stage(0)

    @classmethod
    def patch_side(cls, cfg, stage: int) -> int:
        m = cfg.method
        if m.patch_sizes is not None:
            return int(m.patch_sizes[stage])
        return shallow_min_patch(stage + 1, cfg.model.kernel)

    @classmethod
    def validate(cls, cfg, data_info):
        from fastssl.errors import ConfigError

        m, size = cfg.method, data_info["image_size"]
        if cfg.model.arch != "shallow":
            raise ConfigError(
                f"model.arch: layerwise trains the 'shallow' net one stage at a time, got {cfg.model.arch!r}"
            )
        if not 1 <= m.layers <= 3:
            raise ConfigError(f"method.layers: must be 1..3 (stages of the shallow net), got {m.layers}")
        if m.hardest and (m.mining != "random" or m.pairs != "one"):
            raise ConfigError(
                f"method.hardest: hardest-negative mining replaces the sampled negative of pairs=one; "
                f"it cannot be combined with mining={m.mining}, pairs={m.pairs}"
            )
        if m.margin < 0:
            raise ConfigError(f"method.margin: must be >= 0, got {m.margin}")
        check_jitter(m.color)
        if m.patch_sizes is not None and len(m.patch_sizes) != m.layers:
            raise ConfigError(f"method.patch_sizes: {len(m.patch_sizes)} sizes for {m.layers} layers")
        for k in range(m.layers):
            p, need = cls.patch_side(cfg, k), shallow_min_patch(k + 1, cfg.model.kernel)
            key = f"method.patch_sizes[{k}]"
            if p < need:
                raise ConfigError(
                    f"{key}: {p} px is smaller than the {need} px receptive field of {k + 1} layer(s) "
                    f"({cfg.model.kernel}x{cfg.model.kernel} conv + 2x2 max-pool each)"
                )
            if not 1 <= m.max_shift < p:
                raise ConfigError(
                    f"method.max_shift: {m.max_shift} must be in [1, {p - 1}] so that {p} px patches overlap"
                )
            if p + m.max_shift > size:
                raise ConfigError(f"{key}: {p} px patches shifted by {m.max_shift} do not fit {size}x{size} images")
            if m.pairs == "subpatches" and p + 1 > size:
                raise ConfigError(f"{key}: the {p + 1} px crop of pairs=subpatches does not fit {size}x{size} images")

    # ---- stages
    def loader(self, cfg, source, rank: int = 0, world: int = 1, device_id=None, device="cpu"):
        """input=raw: the same executors on a source seen with mean 0 / std 1 (pixels / 255)."""
        return super().loader(
            cfg, _RawPixels(source) if cfg.method.input == "raw" else source, rank, world, device_id, device
        )

    @classmethod
    def eval_input(cls, cfg, source):
        if cfg.method.input == "raw":
            return lambda x: x.float() / 255.0
        return super().eval_input(cfg, source)

    @classmethod
    def input_spec(cls, cfg, stats=None):
        if cfg.method.input == "raw":
            return {"pixels": "x / 255", "note": "method.input=raw: the network sees [0, 1] pixels"}
        return super().input_spec(cfg, stats)

    @classmethod
    def feature_stage(cls, cfg):
        """The last stage it trained (the deeper ones stay untrained)."""
        return f"layer{cfg.method.layers}"

    def begin_stage(self, stage: int, source=None) -> None:
        """Train stage ``stage`` only: earlier stages frozen, later ones not used."""
        self.stage = stage
        for i, (name, mod) in enumerate(self.backbone.stages.items()):
            for p in mod.parameters():
                p.requires_grad_(i == stage)

    def end_stage(self, stage: int, out_dir: str) -> None:
        import torchvision

        conv = self.backbone.stages[f"layer{stage + 1}"][0]
        d = os.path.join(out_dir, "filters")
        os.makedirs(d, exist_ok=True)
        w = conv.weight.detach().float().cpu()
        torch.save(w, os.path.join(d, f"layer{stage + 1}.pt"))
        if stage == 0:  # RGB filters: one tile each, contrast-stretched per filter
            grid = torchvision.utils.make_grid(
                w, nrow=int(np.ceil(np.sqrt(len(w)))), normalize=True, scale_each=True, padding=1
            )
            big = torch.nn.functional.interpolate(grid[None], scale_factor=8, mode="nearest")[0]
            torchvision.utils.save_image(big, os.path.join(d, "layer1.png"))

    # ---- recipe
    @property
    def view_size(self):
        return self.patch_side(self.cfg, self.stage)

    def recipe(self):
        if self.cfg.method.pairs == "subpatches":  # one crop, cut into sub-patches in forward (same pixels everywhere)
            ops = [Crop(), Flip()] + [HSV()] * jitter_active(self.cfg.method.color) + [Normalise()]
            return Recipe(
                self.draw_crop,
                ops,
                views=1,
                size=self.view_size + 1,
                name=f"layerwise sub-patch crop (stage {self.stage + 1})",
            )
        ops = [Crop()] + [HSV()] * jitter_active(self.cfg.method.color) + [Normalise()]
        return Recipe(self.draw, ops, views=3, size=self.view_size, name=f"layerwise crop (stage {self.stage + 1})")

    def draw_crop(self, rng, n, shapes=None):
        """pairs=subpatches: one (p+1)x(p+1) crop anywhere in the image, flipped with probability
        1/2 (the authors' RandomCrop + RandomHorizontalFlip); its four p x p sub-patches are the
        views of one group."""
        c = self.view_size + 1
        boxes = np.empty((n, 1, 4), np.int32)
        boxes[..., 2:] = c
        boxes[:, 0, :2] = (
            rng.integers(0, self.image_size - c + 1, size=(n, 2))
            if shapes is None
            else positions(rng, shapes - c + 1, (n, 2))
        )
        flip = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        return {"box": boxes, "flip": flip, "hsv": draw_hsv(rng, n, 1, self.cfg.method.color)}

    def draw(self, rng, n, shapes=None):
        """Anchor, a positive shifted by at most max_shift (never by 0) and a random negative;
        ``shapes`` (n, 2): over frames of these sizes (folders) instead of the square."""
        p, s, shift = self.view_size, self.image_size, self.cfg.method.max_shift
        boxes = np.empty((n, 3, 4), np.int32)
        boxes[..., 2:] = p
        if shapes is None:  # anchor anywhere the shifted positive still fits
            anchor = (
                rng.integers(shift, s - p - shift + 1, size=(n, 2))
                if s - p >= 2 * shift
                else rng.integers(0, s - p + 1, size=(n, 2))
            )
        else:
            room = shapes - p >= 2 * shift
            anchor = np.where(
                room, shift + positions(rng, shapes - p - 2 * shift + 1, (n, 2)), positions(rng, shapes - p + 1, (n, 2))
            )
        d = rng.integers(-shift, shift + 1, size=(n, 2))
        zero = (d == 0).all(1)
        d[zero, 1] = rng.choice([-1, 1], size=zero.sum()) * rng.integers(
            1, shift + 1, size=zero.sum()
        )  # adjacent, not equal
        hi = s - p if shapes is None else shapes - p
        pos = np.clip(anchor + d, 0, hi)
        boxes[:, 0, :2], boxes[:, 1, :2] = anchor, pos
        # the next image's negative
        boxes[:, 2, :2] = rng.integers(0, s - p + 1, size=(n, 2)) if shapes is None else positions(rng, hi + 1, (n, 2))
        return {"box": boxes, "flip": np.zeros((n, 3), np.uint8), "hsv": draw_hsv(rng, n, 3, self.cfg.method.color)}

    def monitor_features(self, x):
        """The stage being trained (later stages are untrained, and too deep for small images)."""
        return self.backbone.features(x, self.backbone.stage_names[self.stage])

    # ---- loss
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen stages (no graph), then the trained stage; spatially max-pooled to a vector."""
        stages = list(self.backbone.stages.values())
        with torch.no_grad():
            for mod in stages[: self.stage]:
                x = mod(x)
        if self.cfg.method.embedding == "flatten":  # conv + ReLU map, unpooled (the authors' use_pooling=False)
            return loss_input(stages[self.stage][:-1](x).flatten(1))
        return loss_input(
            stages[self.stage](x).amax(dim=(2, 3))
        )  # (the autocast dtype: see fastssl/losses/precision.py)

    def subpatches(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, C, p+1, p+1) crops -> (4B, C, p, p): each crop's four sub-patches (stride 1) in
        row-major order, crop-major (the authors' networks.generate_patches)."""
        p = self.view_size
        x = crops.unfold(2, p, 1).unfold(3, p, 1).permute(0, 2, 3, 1, 4, 5)
        return x.reshape(-1, crops.shape[1], p, p)

    def groups(self, views):
        """(embeddings (N, D), label per row, (anchor, positive) row pairs ordered by label then
        pair, as the authors' selector iterates)."""
        if self.cfg.method.pairs == "subpatches":
            e = self.embed(self.subpatches(views[0]))
            per, within = 4, SUBPATCH_PAIRS
        else:  # image i's rows: anchor, positive, third patch
            e = torch.stack(self.embed(torch.cat(views, 0)).chunk(3), 1).flatten(0, 1)
            per, within = 3, [(0, 1)]
        b = e.shape[0] // per
        labels = torch.arange(b, device=e.device).repeat_interleave(per)
        base = torch.arange(b, device=e.device)[:, None, None] * per
        pairs = (base + torch.tensor(within, device=e.device)).reshape(-1, 2)
        return e, labels, pairs

    def forward(self, views, index):
        m = self.cfg.method
        if m.mining == "semihard":
            e, labels, pairs = self.groups(views)
            u = torch.rand(pairs.shape[0], dtype=torch.float64, device=e.device)  # the draw among semi-hard negatives
            fn = semihard_triplet_loss_eager
            if self.loss_impl(e, "triplet", B=e.shape[0], D=e.shape[1]) == "fused":
                from fastssl.kernels.triplet import semihard_triplet_loss_fused  # (Triton: imported only when chosen)

                fn = semihard_triplet_loss_fused
            loss, kept = fn(e, labels, pairs, margin=m.margin, distance=m.distance, u=u)
            return {"loss": loss, "triplets": torch.tensor(kept / pairs.shape[0], device=e.device)}  # kept fraction
        if m.pairs == "subpatches":  # anchor of sub-patch i of crop c: negative = sub-patch i of crop c-1
            e, _, pairs = self.groups(views)
            a, p = e[pairs[:, 0]], e[pairs[:, 1]]
            n = e.view(-1, 4, e.shape[1]).roll(1, dims=0).flatten(0, 1)[pairs[:, 0]]
        else:
            a, p, n = self.embed(torch.cat(views, 0)).chunk(3)
            n = n.roll(1, dims=0)  # image i's third patch is the negative of image i+1
        kw = dict(margin=m.margin, distance=m.distance, hardest=m.hardest)
        if self.loss_impl(a, "triplet", B=a.shape[0], D=a.shape[1]) == "fused":
            from fastssl.kernels.triplet import triplet_loss_fused  # (Triton: imported only when chosen)

            loss = triplet_loss_fused(a, p, n, tf32=self.loss_tf32(a), **kw)
        else:
            loss = triplet_loss_eager(a, p, n, **kw)
        return {"loss": loss}
