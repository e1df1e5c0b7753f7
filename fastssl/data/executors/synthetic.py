"""The ceiling of a training step: no data work at all.  The first batch the real executor makes
is kept on the training device and served at every step of every epoch (``data.pipeline=
synthetic``), so a run measures the model, the loss and the optimiser alone; the throughput
benchmarks put it beside the real pipelines (``python -m benchmarks.imagenet``).  The features do
not learn anything useful from one batch: a measurement, not a training mode."""

from __future__ import annotations

import torch


class SyntheticExecutor:
    """``inner``'s first batch, on ``device``, for every step (the executor interface:
    ``set_epoch``, ``len``, iterate)."""

    def __init__(self, inner, device):
        self.inner, self.device = inner, torch.device(device)
        self.steps_per_epoch = inner.steps_per_epoch
        self.start_step, self.batch = 0, None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step

    def __iter__(self):
        if self.batch is None:
            self.inner.set_epoch(0, 0)
            first = next(iter(self.inner))
            self.batch = {
                "views": [v.to(self.device) for v in first["views"]],
                "index": first["index"].to(self.device),
            }
            self.inner = None  # (its workers and memory are no longer needed)
        for _ in range(self.start_step, self.steps_per_epoch):
            yield self.batch
