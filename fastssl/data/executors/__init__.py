"""Executors of a recipe's plan, behind one interface (``executors/base.py``: ``set_epoch``,
iterate for ``{"views", "index"}`` batches):

* ``dali-gpu`` / ``dali-cpu``: the recipe's DALI faces, one graph for both backends (``dali.py``);
* ``torch``: its torch faces in DataLoader worker processes, the baseline (``dataloader.py``);
* ``tensor``: its torch faces on the in-memory dataset resident on the training device (``tensor.py``);
* ``synthetic``: the first batch of the ``auto`` executor, served at every step: the ceiling a
  benchmark compares the real pipelines with (``synthetic.py``).

``data.pipeline=auto`` is dali-gpu on a CUDA machine where DALI loads and the recipe's GPU
graph builds, dali-cpu on a machine without CUDA where DALI loads; where DALI cannot be used it
falls back to the executor that needs nothing more than torch (``tensor`` for in-memory sources,
``torch`` for folders) and says once, in one line, why.  An explicit ``dali-gpu`` or
``dali-cpu`` that cannot run stops before training with one line (``PipelineBuildError``).
"""

from __future__ import annotations

import functools

import torch

from fastssl.data.dali_check import PipelineBuildError, dali_problem
from fastssl.data.executors.base import Executor, run_torch
from fastssl.data.plan import steps_per_epoch
from fastssl.data.recipe import Recipe
from fastssl.log import get_logger

__all__ = ["Executor", "PipelineBuildError", "build_loader", "choose_pipeline", "run_torch", "steps_per_epoch"]

log = get_logger("fastssl.data")


def fallback(split) -> str:
    """The executor that needs only torch: ``tensor`` (the dataset on the training device) for
    in-memory images, ``torch`` (DataLoader workers decoding files) for a folder's files."""
    return "torch" if getattr(split, "encoded", False) else "tensor"


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.warning(message)


def choose_pipeline(name: str, split=None, gpu_graph=None) -> str:
    """The executor ``data.pipeline=name`` runs on ``split``.  ``auto``: DALI where it loads (and,
    on a GPU, where ``gpu_graph()`` builds the recipe's graph), else ``fallback(split)``, said
    once.  An explicit DALI pipeline that cannot run raises ``PipelineBuildError`` (one line)."""
    if name not in ("auto", "dali-gpu", "dali-cpu"):
        return name
    gpu = name == "dali-gpu" or (name == "auto" and torch.cuda.is_available())
    kind = "dali-gpu" if gpu else "dali-cpu"
    why = dali_problem()
    if why is None and gpu and gpu_graph is not None:
        try:
            gpu_graph()
        except PipelineBuildError as e:
            if name != "auto":
                raise
            why = str(e)
    elif why is not None and name != "auto":
        raise PipelineBuildError(
            f"data.pipeline={name}: NVIDIA DALI cannot be loaded ({why}); use data.pipeline={fallback(split)} "
            f"(or auto, which falls back by itself), or install the DALI build for this machine (docs: Install)"
        )
    if why is None:
        return kind
    other = fallback(split)
    _say_once(f"fastssl: data.pipeline=auto: {kind} is not usable here ({why}); training on {other} instead")
    return other


def build_loader(cfg, source, split, recipe: Recipe, rank: int = 0, world: int = 1, device_id=None, device="cpu"):
    """The pretraining loader of ``recipe`` on ``split``, per ``data.pipeline`` (``device``: where
    the tensor executor keeps the dataset)."""

    def gpu_graph():  # a graph the GPU backend refuses fails here, in one line, not at the first batch
        from fastssl.data.dali_check import check_gpu_graph, crop_pipeline

        check_gpu_graph(
            lambda: crop_pipeline(
                recipe, source, split, cfg.data.batch_size, cfg.data.reader_workers, cfg.data.hw_decoder_load
            ),
            f"the {recipe.name} graph",
        )

    kind = choose_pipeline(cfg.data.pipeline, split, gpu_graph)
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
    if kind == "synthetic":  # (the ceiling: the real executor's first batch, every step)
        from fastssl.data.executors.synthetic import SyntheticExecutor

        inner = _executor(choose_pipeline("auto", split, gpu_graph), cfg, source, common, device, device_id)
        loader = SyntheticExecutor(inner, device)
    else:
        loader = _executor(kind, cfg, source, common, device, device_id)
    loader.pipeline = kind  # (what the run's banner names)
    return loader


def _executor(kind: str, cfg, source, common: dict, device, device_id) -> Executor:
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
