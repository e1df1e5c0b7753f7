"""The training step without host synchronisation: the device decides, the host learns a step late.

A CUDA step is a queue of kernels the CPU fills ahead of the GPU.  Any read of a device value on
the host (``.item()``, ``.tolist()``, ``bool(t)``, a ``nonzero``) drains that queue: the CPU waits
for the GPU, then the GPU waits for the CPU to enqueue the next step.  The step's two decisions
are therefore taken without such a read:

* **skip a non-finite step** on the device: the flag is computed from the gradients after DDP
  has averaged them (so it is the same on every rank without a collective of its own), and the
  fused optimisers take it as ``found_inf`` and leave parameters and optimiser state untouched
  (``skip_flag``, ``optimizer_step``);
* **stop on a signal** one step late: each rank's request is all-reduced together with the
  skip flag, copied to pinned host memory behind the step's own work, and read at the next
  step, when that copy has long finished (``Votes``).

The host's bookkeeping (the skipped-step count, the log line, the stop) follows one step late,
and exactly at logging, checkpoint and epoch-end steps, which read the current step's flags too
(they synchronise anyway).  Every read the loop does on purpose is marked ``intended_read``:
``tests/test_sync.py`` counts the unmarked ones and checks that their number does not grow with
the number of steps.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import List, Tuple

import torch
import torch.distributed as dist

_MARK = threading.local()


@contextlib.contextmanager
def intended_read(why: str):
    """Mark a host read of a device value as deliberate (``why``: for the reader of the code)."""
    prev = getattr(_MARK, "why", None)
    _MARK.why = why
    try:
        yield
    finally:
        _MARK.why = prev


def reading_intended() -> bool:
    """Whether the current code runs inside ``intended_read`` (the sync-counting test asks)."""
    return getattr(_MARK, "why", None) is not None


def skip_flag(params, total_norm: torch.Tensor | None = None) -> torch.Tensor:
    """A 0-d bool tensor on the gradients' device: some gradient is not finite (NaN or inf, or a
    total norm beyond float range).  ``total_norm``: the norm ``clip_grad_norm_`` returned, when
    the step clipped (no second pass over the gradients)."""
    if total_norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads)
    return ~torch.isfinite(total_norm)


def supports_found_inf(optimizer) -> bool:
    """Fused torch optimisers skip their update on the device when ``found_inf`` is set."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def optimizer_step(optimizer, scaler, skip: torch.Tensor) -> None:
    """The optimiser's step, none when ``skip``.  fp16 (an enabled GradScaler): the scaler's own
    device-side check of the same gradients decides, and its scale backs off.  A fused optimiser
    takes ``skip`` as ``found_inf``, on the device.  Otherwise (foreach on the CPU, where every
    op has already run when the host reads) the host reads the flag."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif supports_found_inf(optimizer):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    else:
        with intended_read("an optimiser without a device-side skip (CPU: nothing is in flight)"):
            bad = bool(skip)
        if not bad:
            optimizer.step()


def zero_momentum(optimizer) -> None:
    """Give a fused SGD its momentum buffers before the first step: a first step skipped through
    ``found_inf`` would otherwise leave them uninitialised (torch allocates them with
    ``empty_like`` and fills them in the kernel that the skip bypasses).  A zero buffer makes the
    first update exactly the gradient, as torch's own first step does."""
    if not (isinstance(optimizer, torch.optim.SGD) and supports_found_inf(optimizer)):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class Votes:
    """Per step, every rank's (skipped, stop asked) flags, read on the host one step late.

    ``cast(step, skip, stop)`` puts this step's flags on the device, all-reduced (max) over
    the ranks without waiting (NCCL: queued on the stream; gloo: an async work item), and on a
    GPU starts their copy to pinned host memory behind the step's work.  ``take(now)``
    returns the ``(step, skipped, stop)`` rows that are ready: the previous steps', or every row
    up to this step when ``now`` (a logging, checkpoint or epoch-end step: the same on every
    rank, so all ranks see the same rows at the same step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.pending: deque = deque()

    def cast(self, step: int, skip: torch.Tensor, stop: bool) -> None:
        flags = torch.stack([skip.reshape(()).float(), torch.full((), float(stop), device=skip.device)])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if self.world > 1 else None
        event = None
        if flags.is_cuda:
            if work is not None:
                work.wait()  # (NCCL: the stream waits, the host does not)
                work = None
            host = torch.empty(2, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        self.pending.append((step, flags, work, event))

    def take(self, now: bool = False) -> List[Tuple[int, bool, bool]]:
        keep = 0 if now else 1
        out = []
        while len(self.pending) > keep:
            step, flags, work, event = self.pending.popleft()
            with intended_read("the flags of a finished step, or a logging/checkpoint step"):
                if work is not None:
                    work.wait()
                if event is not None:
                    event.synchronize()
                skipped, stop = (v > 0 for v in flags.tolist())
            out.append((step, skipped, stop))
        return out
