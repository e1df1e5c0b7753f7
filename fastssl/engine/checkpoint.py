"""Checkpoints: written atomically, holding everything needed to continue bit for bit.

A checkpoint holds the model (the method module: backbone + heads + state such as memory
banks), optimiser, scheduler, grad scaler, all RNG states, the data position (epoch and the
next step within it) and the run's config.  It is written to a temporary file in the same
folder, flushed to disk, then renamed over ``last.pt``: a run that dies at any moment leaves
the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from typing import Any, Dict

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def rng_state() -> Dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _FailingFile:
    """A file that raises ENOSPC after ``limit`` bytes (injected full disk, for tests)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, b) -> int:
        if len(b) > self.left:
            self.f.write(bytes(b)[: self.left])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def save_atomic(obj: Dict[str, Any], path: str, fail_after_bytes: int | None = None) -> None:
    """Write ``obj`` to a temporary file beside ``path``, fsync, rename over ``path``.  On any
    error the temporary file is removed and ``path`` keeps its previous content."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f if fail_after_bytes is None else _FailingFile(f, fail_after_bytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, RuntimeError):  # torch's zip writer turns a failed write into this
            cause = e.__context__ if isinstance(e.__context__, OSError) else None
            free = shutil.disk_usage(d).free / 2 ** 30
            raise OSError(getattr(cause, "errno", errno.EIO),
                          f"writing {path} failed: {cause or e} ({free:.2f} GiB free on that disk)") from e
        raise


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from None
    for k in ("model", "config", "epoch", "step", "step_in_epoch"):
        if k not in ck:
            raise CheckpointError(f"checkpoint {path} lacks the field {k!r}")
    return ck


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
