"""The interface every method implements (see sc.py for a complete, small example)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

from fastssl.models import Backbone


@dataclass
class MethodConfig:
    name: str = "?"


class Method(nn.Module):
    """A self-supervised method: a backbone, the method's own heads/state, and its loss.

    Subclasses set ``name`` and ``Config`` and implement ``crop_plan`` (the pipeline recipe:
    which boxes of each image become the views, computed on the host from a seeded RNG so that
    every pipeline and a resumed run see exactly the same crops) and ``forward`` (views -> loss).
    """

    name: str = "?"
    Config = MethodConfig
    find_unused_parameters: bool = False
    num_views: int = 2  # crops per image the pipeline delivers
    resize_views: bool = False  # True when boxes differ from view_size and must be resized
    color_jitter: bool = False  # True when the plan's colour changes must be applied
    num_stages: int = 1  # training stages (e.g. one per layer); each gets train.epochs epochs
    view_transform = None  # replaces the pipeline's normalisation (e.g. data.color.ColorSplit)
    ddp_keep_local: Tuple[str, ...] = ()  # buffers the method keeps equal on all ranks itself (no DDP broadcast)

    def __init__(self, cfg, backbone: Backbone, image_size: int, num_images: int = 0):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.image_size = image_size
        self.num_images = num_images  # size of the pre-training split (for per-image state)

    def begin_stage(self, stage: int, source=None) -> None:
        """Before a stage's loader and optimiser are built: set what trains and the crop recipe
        (``source``: the data, for methods whose state is built from the images)."""

    def epoch_items(self, num_images: int) -> int:
        """Samples per epoch (default: every pre-training image once)."""
        return num_images

    def make_loader(self, cfg, source, rank: int, world: int, device_id):
        """A method whose samples are not crops of one image each (Exemplar-CNN's surrogate
        patches) returns its own loader here; None = the shared crop-plan pipeline."""
        return None

    def end_stage(self, stage: int, out_dir: str) -> None:
        """After a stage's last step, on rank 0 (e.g. write the learned filters)."""

    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        """Before an epoch's first step on every rank; ``fresh`` is False when a resumed run
        re-enters the epoch mid-way (state built at the epoch's start is in the checkpoint)."""

    def after_step(self) -> None:
        """After each optimiser step, on every rank: update method state (e.g. a memory bank)."""

    def end_epoch(self, epoch: int, source) -> Dict[str, float]:
        """After an epoch, on every rank: method state upkeep and monitors, returned for the log."""
        return {}

    def loss_impl(self, t: torch.Tensor, kernel: str) -> str:
        """``loss.impl`` resolved for the fused ``kernel`` (a name in fastssl.kernels.selfcheck)
        on tensors like ``t``: auto = fused on CUDA when the kernel passed its one-time check
        against the eager twin in this process, eager otherwise (said once)."""
        from fastssl.kernels.selfcheck import resolve

        return resolve(self.cfg.loss.impl, kernel, t)

    def monitor_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features the online kNN monitor probes (engine/monitors.py): the backbone's pooled
        ``eval.layer`` (default: last stage) of whole images prepared by ``eval_input``."""
        return self.backbone.features(x, self.cfg.eval.layer)

    @classmethod
    def eval_input(cls, cfg, source):
        """The network input of whole images for evaluation: (B, 3, H, W) uint8 -> float."""
        mean = torch.tensor(source.mean).view(1, 3, 1, 1)
        std = torch.tensor(source.std).view(1, 3, 1, 1)
        return lambda x: (x.float() / 255.0 - mean.to(x.device)) / std.to(x.device)

    @classmethod
    def validate(cls, cfg, data_info: Dict) -> None:
        """Raise fastssl.config.ConfigError for impossible method settings."""

    @property
    def view_size(self) -> int:
        """Side of every view the pipeline delivers."""
        raise NotImplementedError

    def crop_plan(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (n, V, 4) int32 as (y, x, h, w) in image pixels, flips (n, V) uint8 and
        colour changes (n, V, 3) float32 (hue degrees, saturation, value; see data.pipeline)."""
        raise NotImplementedError

    def forward(self, views, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns a dict with at least ``loss`` (scalar); other entries are logged."""
        raise NotImplementedError
