"""The dtype policy of the eager losses (the fused kernels follow the same one; fastssl/kernels/_common.py).

* The eager forms compute in fp32: inputs upcast to fp32, products and sums in fp32, with
  autocast switched off (``no_autocast``), so that an eager loss under ``torch.autocast`` is
  still the reference and not a bf16 matmul; every output is fp32.
* Methods hand the eager form and the fused kernel the same tensors: ``loss_input`` casts
  features to the autocast dtype when autocast is on (bf16 on GPUs by default), so the fused
  kernel uses the tensor cores and the eager form sees the same numbers.
"""

from __future__ import annotations

import functools

import torch


def no_autocast(fn):
    """Run ``fn`` with autocast off on every device type (the maths is written in fp32)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def loss_input(t: torch.Tensor) -> torch.Tensor:
    """Features as a loss receives them: in the autocast dtype when autocast is on for ``t``'s
    device (bf16 by default on GPUs: the fused kernels then use the tensor cores, and the eager
    twin sees the same numbers), else fp32."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return t.to(torch.get_autocast_dtype(kind))
    return t.float()
