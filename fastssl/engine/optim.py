"""Optimiser, learning-rate schedule and mixed precision.

torch's own optimisers, fused on CUDA: their ``found_inf`` path skips a non-finite step on the
device (apex's fused optimisers, which NGC images ship, have none, so they are not used).  The parameter groups are
the method's (``Method.param_groups``: by default biases and norm parameters get no weight
decay; Exemplar-CNN sets per-layer learning rates and L2).  The schedule is a per-step multiplier (LambdaLR), so a
resumed run continues it exactly.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastssl.engine.sync import zero_momentum


def build_optimizer(cfg, model, global_batch: int, device: torch.device):
    """The optimiser over ``model.param_groups`` (a ``fastssl.methods.base.Method``), lr scaled
    linearly with the global batch (``optim.scale_lr``); returns it and its name for the log.

    ``optim.impl``: ``fused`` (one kernel per step, and a non-finite step skipped on the device:
    ``fastssl.engine.sync``), ``foreach``, or ``auto`` = fused on CUDA, foreach on the CPU (whose
    numbers every CPU result so far was measured with; fused rounds differently in the last bit)."""
    o = cfg.optim
    lr = o.lr * global_batch / 256 if o.scale_lr else o.lr
    groups = model.param_groups(lr, o.weight_decay)
    fused = o.impl == "fused" or (o.impl == "auto" and device.type == "cuda")
    kw = {"fused": True} if fused else {"foreach": True}
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, **kw)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, **kw)
    zero_momentum(opt)
    return opt, f"torch.{type(opt).__name__} ({'fused' if fused else 'foreach'})"


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up, then cosine/step/constant."""
    o = cfg.optim
    total = cfg.train.epochs * steps_per_epoch
    warm = int(o.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if o.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if o.schedule == "step":
        epoch = step / steps_per_epoch
        gammas = list(o.gammas) or [o.gamma] * len(o.milestones)
        return math.prod(g for g, m in zip(gammas, o.milestones) if epoch >= m)
    return 1.0


def build_scheduler(cfg, optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))


def resolve_precision(cfg, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 (bf16 needs none); disabled otherwise so the code path is one."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
