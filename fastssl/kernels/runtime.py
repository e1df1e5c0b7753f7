"""Where the fused kernels can run, answered without importing Triton (``loss.impl`` is checked,
and ``auto`` resolved to eager on a CPU, by code that must not import it: fastssl/config.py,
fastssl/kernels/selfcheck.py)."""

from __future__ import annotations

import os

import torch


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t``: on CUDA, or anywhere under the interpreter."""
    return t.is_cuda or interpreted()
