"""What every evaluation protocol shares: the protocol registry of ``python -m fastssl.eval``,
repeated seeded runs recorded in a ledger (mean +- std), and one supervised training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.errors import ConfigError
from fastssl.eval.ledger import NO_LEDGER


@dataclass(frozen=True)
class EvalJob:
    """What a protocol is handed: the run's config (its settings are ``cfg.eval``), the labelled
    source, the frozen backbone, the method's ``prepare`` (uint8 images -> the network's input),
    the device, a log function and the ledger of finished runs."""

    cfg: Any
    source: Any
    backbone: torch.nn.Module
    prepare: Callable
    device: torch.device
    log: Callable[[str], None] = print
    ledger: Any = NO_LEDGER

    @property
    def settings(self):
        return self.cfg.eval


# name -> fn(job: EvalJob) -> result dict, in registration order
PROTOCOLS: Dict[str, Callable[[EvalJob], Dict]] = {}


def protocol(name: str):
    """Registers ``fn`` as ``--protocol name``."""

    def register(fn):
        PROTOCOLS[name] = fn
        return fn

    return register


def get_protocol(name: str) -> Callable:
    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def repeat_runs(
    n: int,
    run_fn: Callable[[int], float],
    ledger=NO_LEDGER,
    log=print,
    message: Optional[Callable[[int, float], str]] = None,
    **extra,
) -> Dict:
    """Runs ``run_fn(k)`` -> accuracy for k = 0..n-1, skipping the runs already in ``ledger`` and
    recording each new one at once; ``message(k, acc)`` is logged after each new run.  Returns
    mean, std and the runs, plus the protocol's ``extra`` keys."""
    accs = []
    for k in range(n):
        if ledger.has(k):
            accs.append(ledger.get(k))
            continue
        accs.append(run_fn(k))
        ledger.add(k, accs[-1])
        if message is not None:
            log(message(k, accs[-1]))
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs, **extra}


def batch_starts(n: int, batch_size: int, drop_last: bool = False) -> range:
    """Start of each batch of an epoch; ``drop_last`` keeps full batches only (one batch of all
    ``n`` when there are fewer)."""
    return range(0, n - batch_size + 1 if drop_last and n >= batch_size else n, batch_size)


def train_supervised(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    device,
    *,
    make_opt: Callable,
    schedule: Optional[Callable] = None,
    epoch_lr: Optional[Callable[[int], float]] = None,
    drop_last: bool = False,
    augment: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    ledger=NO_LEDGER,
) -> torch.nn.Module:
    """Cross-entropy training of ``model`` on (``x``, ``y``) in shuffled batches.

    ``make_opt(model)`` builds the optimiser; ``schedule(opt, steps)`` a scheduler stepped after
    every step, or ``epoch_lr(epoch)`` sets the learning rate at each epoch's start.  Every epoch's
    permutation (and ``augment(xb, generator)``) draws from ``generator``, the global RNG if None.
    ``ledger.check()`` at each epoch's start stops a pre-empted evaluation.
    """
    opt = make_opt(model)
    starts = batch_starts(len(x), batch_size, drop_last)
    sched = schedule(opt, max(1, epochs * len(starts))) if schedule is not None else None
    for ep in range(epochs):
        ledger.check()
        if epoch_lr is not None:
            for group in opt.param_groups:
                group["lr"] = epoch_lr(ep)
        model.train()
        perm = torch.randperm(len(x), generator=generator)
        for s in starts:
            b = perm[s : s + batch_size]
            xb = x[b] if augment is None else augment(x[b], generator)
            loss = F.cross_entropy(model(xb.to(device)), y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model


@torch.no_grad()
def percent_correct(model: torch.nn.Module, batches, n: int) -> float:
    """Percent of the ``n`` images of ``batches`` ((input, labels) pairs) classified right."""
    model.eval()
    correct = sum((model(xb).argmax(1).cpu() == yb).sum().item() for xb, yb in batches)
    return 100.0 * correct / n
