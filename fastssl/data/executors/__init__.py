"""Executors of a recipe's plan, behind one interface (``executors/base.py``: ``set_epoch``,
iterate for ``{"views", "index"}`` batches):

* ``dali-gpu`` / ``dali-cpu``: the recipe's DALI faces, one graph for both backends (``dali.py``);
* ``torch``: its torch faces in DataLoader worker processes, the baseline (``dataloader.py``);
* ``tensor``: its torch faces on the in-memory dataset resident on the training device (``tensor.py``).

``data.pipeline=auto`` is dali-gpu on a CUDA machine and dali-cpu otherwise.
"""

from __future__ import annotations

import torch

from fastssl.data.executors.base import Executor, run_torch
from fastssl.data.plan import steps_per_epoch
from fastssl.data.recipe import Recipe

__all__ = ["Executor", "build_loader", "resolve_pipeline", "run_torch", "steps_per_epoch"]


def resolve_pipeline(name: str) -> str:
    if name == "auto":
        return "dali-gpu" if torch.cuda.is_available() else "dali-cpu"
    return name


def build_loader(cfg, source, split, recipe: Recipe, rank: int = 0, world: int = 1, device_id=None, device="cpu"):
    """The pretraining loader of ``recipe`` on ``split``, per ``data.pipeline`` (``device``: where
    the tensor executor keeps the dataset)."""
    kind = resolve_pipeline(cfg.data.pipeline)
    common = dict(
        split=split,
        recipe=recipe,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        rank=rank,
        world=world,
        mean=source.mean,
        std=source.std,
    )
    if kind == "tensor":
        from fastssl.data.executors.tensor import TensorExecutor

        return TensorExecutor(**common, device=device)
    if kind == "torch":
        from fastssl.data.executors.dataloader import TorchExecutor

        return TorchExecutor(
            **common,
            base_size=source.image_size,
            num_workers=cfg.data.num_workers,
            prefetch=cfg.data.prefetch,
            pin_memory=torch.cuda.is_available(),
        )
    from fastssl.data.executors.dali import DaliExecutor

    if kind == "dali-gpu":  # a graph the GPU backend refuses fails here, in one line, not at the first batch
        from fastssl.data.dali_check import check_gpu_graph, crop_pipeline

        check_gpu_graph(
            lambda: crop_pipeline(
                recipe, source, split, cfg.data.batch_size, cfg.data.reader_workers, cfg.data.hw_decoder_load
            ),
            f"the {recipe.name} graph",
        )
    return DaliExecutor(
        **common,
        device="gpu" if kind == "dali-gpu" else "cpu",
        base_size=source.image_size,
        num_threads=max(1, cfg.data.num_workers),
        prefetch=cfg.data.prefetch,
        device_id=device_id,
        reader_workers=cfg.data.reader_workers,
        hw_decoder_load=cfg.data.hw_decoder_load,
    )
