"""The interface every method implements (see sc.py for a complete, small example)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastssl.data.recipe import Recipe
from fastssl.models import Backbone


@dataclass
class MethodConfig:
    name: str = "?"


class Method(nn.Module):
    """A self-supervised method: a backbone, the method's own heads/state, and its loss.

    Subclasses set ``name`` and ``Config`` and implement ``recipe`` (a ``data.recipe.Recipe``:
    how the views of each image are drawn on the host from a seeded RNG, so that every executor
    and a resumed run see exactly the same pixels, the ops that make them and their size) and
    ``forward`` (views -> loss).
    """

    name: str = "?"
    Config = MethodConfig
    find_unused_parameters: bool = False
    num_stages: int = 1  # training stages (e.g. one per layer); each gets train.epochs epochs
    ddp_keep_local: Tuple[str, ...] = ()  # buffers the method keeps equal on all ranks itself (no DDP broadcast)

    # ---- what the tools ask of a method (the doctor, the benchmarks, the report, export): declared
    # here, so that no tool names a method. Every tool runs a method on its built-in config,
    # ``configs/<name>/builtin.yaml``.
    tool_order: int = 100  # place in the tools' per-method lists (doctor rows, benchmark rows); ties by name
    tiny: Tuple[str, ...] = ()  # overrides that shrink the built-in config further for smoke runs (doctor rows)
    # Default rows in the per-method benchmarks: "pipelines" (benchmarks.pipelines), "train_step"
    # (benchmarks.train_step), "train_step-tiny" (also in `python -m benchmarks --tiny`),
    # "compare-impls" (benchmarks.train_step --compare-impls: fused vs eager losses).
    benchmarks: Tuple[str, ...] = ("pipelines", "train_step", "train_step-tiny")
    report_stage: bool = False  # the report's checkpoint line names the training stage (e.g. one per layer)

    def __init__(self, cfg, backbone: Backbone, image_size: int, num_images: int = 0):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.image_size = image_size
        self.num_images = num_images  # size of the pre-training split (for per-image state)

    def begin_stage(self, stage: int, source=None) -> None:
        """Before a stage's loader and optimiser are built: set what trains and the data recipe
        (``source``: the data, for methods whose state is built from the images)."""

    def epoch_items(self, num_images: int) -> int:
        """Samples per epoch (default: every pre-training image once)."""
        return num_images

    def make_loader(self, cfg, source, rank: int, world: int, device_id):
        """A method whose samples are not crops of one image each (Exemplar-CNN's surrogate
        patches) returns its own loader here; None = its ``recipe`` on the data.pipeline executor."""
        return None

    def loader(self, cfg, source, rank: int = 0, world: int = 1, device_id=None, device="cpu"):
        """This stage's pretraining loader: ``make_loader``'s, or the recipe on the data.pipeline
        executor (the data layer gets the recipe, not the method)."""
        own = self.make_loader(cfg, source, rank, world, device_id)
        if own is not None:
            return own
        from fastssl.data.executors import build_loader

        return build_loader(cfg, source, source.pretrain, self.recipe(), rank, world, device_id, device)

    def end_stage(self, stage: int, out_dir: str) -> None:
        """After a stage's last step, on rank 0 (e.g. write the learned filters)."""

    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        """Before an epoch's first step on every rank; ``fresh`` is False when a resumed run
        re-enters the epoch mid-way (state built at the epoch's start is in the checkpoint)."""

    def after_step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """After each optimiser step, on every rank: update method state (e.g. a memory bank).
        ``skipped`` (None: not skipped): a 0-d bool tensor on the device, true when the step's gradients were not
        finite and the optimiser left the parameters alone; the state must then stay as it was,
        decided on the device (``torch.where``), not by reading the flag on the host."""

    def end_epoch(self, epoch: int, source) -> Dict[str, float]:
        """After an epoch, on every rank: method state upkeep and monitors, returned for the log."""
        return {}

    def param_groups(self, lr: float, weight_decay: float) -> List[Dict]:
        """The optimiser's parameter groups (lr: the scaled base rate, weight_decay: optim's):
        by default weight decay on the weights and none on biases and norm parameters (ndim <= 1)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def loss_impl(self, t: torch.Tensor, kernel: str, **sizes: int) -> str:
        """``loss.impl`` resolved for the fused ``kernel`` (a name in fastssl.kernels.selfcheck)
        on tensors like ``t`` launched at ``sizes`` (B, D; for the bank also N and K): auto =
        fused on CUDA when the kernel passed its one-time check against the eager twin in this
        process (at sizes that compile the same variant, with ``loss.tf32``), eager otherwise
        (said once)."""
        from fastssl.kernels.selfcheck import resolve

        return resolve(self.cfg.loss.impl, kernel, t, self.loss_tf32(t), **sizes)

    def loss_tf32(self, t: torch.Tensor) -> bool:
        """Whether a fused loss puts fp32 inputs like ``t`` on the TF32 tensor cores
        (``loss.tf32``; None = auto: on CUDA in a mixed-precision run, i.e. under autocast, where
        only InvP's fp32 memory bank still reaches a loss in fp32; an fp32 run stays exact)."""
        choice = self.cfg.loss.tf32
        if choice is None:
            return t.is_cuda and torch.is_autocast_enabled(t.device.type)
        return bool(choice)

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
    def input_spec(cls, cfg, stats: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> Dict:
        """What ``eval_input`` does to uint8 images, written into an exported backbone's
        description (``fastssl export``): ``stats`` = (mean, std) of the data source where known."""
        if stats is None:
            return {"pixels": "(x / 255 - mean) / std", "note": f"the {cfg.data.source} source's mean/std"}
        mean, std = stats
        return {"pixels": "(x / 255 - mean) / std", "mean": list(mean), "std": list(std)}

    @classmethod
    def feature_stage(cls, cfg) -> Optional[str]:
        """The backbone stage whose pooled output stands for the learned features when
        ``eval.layer`` is not set (the report's retrieval); None = the last stage."""
        return None

    @classmethod
    def validate(cls, cfg, data_info: Dict) -> None:
        """Raise fastssl.config.ConfigError for impossible method settings."""

    def recipe(self) -> Recipe:
        """The data recipe of the current stage: plan drawing, ops, views and their size."""
        raise NotImplementedError

    def forward(self, views, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns a dict with at least ``loss`` (scalar); other entries are logged."""
        raise NotImplementedError
