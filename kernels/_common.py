"""Helpers shared by the kernel files."""
from __future__ import annotations

import contextlib
import os

import torch


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t``: on CUDA, or anywhere under the interpreter."""
    return t.is_cuda or interpreted()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ('ieee'); half inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def upcast(dtype: torch.dtype) -> bool:
    """Upcast bf16 tiles before ``tl.dot`` under the interpreter, whose bf16 dot is wrong
    (numpy has no bf16); on the GPU bf16 tiles go to the tensor cores as they are."""
    return interpreted() and dtype == torch.bfloat16
