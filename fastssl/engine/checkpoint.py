"""Checkpoints: written atomically, holding everything needed to continue bit for bit.

A checkpoint holds the model (the method module: backbone + heads + state such as memory
banks), optimiser, scheduler, grad scaler, all RNG states, the data position (epoch and the
next step within it) and the run's config.  It is written to a temporary file in the same
folder, flushed to disk, then renamed over ``last.pt``: a run that dies at any moment leaves
the previous checkpoint intact.

``save`` is the training loop's checkpoint (every rank calls it; rank 0 writes), ``resume`` and
``restore_stage`` read one back; the position fields are ``fastssl.engine.state.RunState``'s.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
import types
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from fastssl import __version__, dist
from fastssl.engine.state import RunState


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
            free = shutil.disk_usage(d).free / 2**30
            raise OSError(
                getattr(cause, "errno", errno.EIO),
                f"writing {path} failed: {cause or e} ({free:.2f} GiB free on that disk)",
            ) from e
        raise


# Modules that checkpoints written by an earlier fastssl name and that have moved since.  Those
# checkpoints pickled the run's config as a structured DictConfig, which names the dataclass of
# every config section; checkpoints now keep the config as plain dicts and lists (``contents``),
# which name no fastssl module.
MOVED_MODULES = {
    "fastssl.data.surrogate": "fastssl.methods.exemplar.surrogate",  # Exemplar-CNN's method.aug (SurrogateAug)
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return super().find_class(MOVED_MODULES.get(module, module), name)


_moved_pickle = types.SimpleNamespace(**{k: getattr(pickle, k) for k in ("load", "loads", "__name__")})
_moved_pickle.Unpickler = _Unpickler  # (torch.load subclasses ``pickle_module.Unpickler``)


def read(path: str, map_location="cpu"):
    """``torch.load`` of a file that may be a checkpoint; a CheckpointError says why it cannot be
    read: a Python module its objects need that does not import here (e.g. triton, or a module of
    another fastssl version: the file itself is fine), or an unreadable / corrupt file.  A module
    that has moved within fastssl is read from where it is now (``MOVED_MODULES``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_moved_pickle)
    except ImportError as e:  # (ModuleNotFoundError included) raised while unpickling the config
        raise CheckpointError(
            f"checkpoint {path} cannot be read here: it needs the Python module {e.name or '?'!r}, which does not "
            f"import in this installation ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the file itself may be fine: install what is missing, or read it with the fastssl that wrote it"
        ) from None
    except AttributeError as e:  # a class the pickle names is not in this fastssl
        raise CheckpointError(
            f"checkpoint {path} cannot be read here: it names something this fastssl "
            f"({__import__('fastssl').__version__}) does not have ({e}); read it with the fastssl that wrote it"
        ) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from None


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    ck = read(path, map_location)
    for k in ("model", "config", "epoch", "step", "step_in_epoch"):
        if k not in ck:
            raise CheckpointError(f"checkpoint {path} lacks the field {k!r}")
    return ck


def contents(model: torch.nn.Module, optim: Optional[Tuple], rngs, position: RunState, config, reason: str):
    """A checkpoint's dict: ``optim`` is the stage's (optimizer, scheduler, grad scaler), or None
    for a checkpoint at a stage's start (the next stage builds its own); ``rngs`` one RNG state
    per rank; ``position`` where a resumed run starts (``RunState.restart_point``)."""
    pos = position.to_dict()
    skipped = pos.pop("skipped_steps")  # (last, in the key order checkpoints have always had)
    opt = (
        {}
        if optim is None
        else {"optimizer": optim[0].state_dict(), "scheduler": optim[1].state_dict(), "scaler": optim[2].state_dict()}
    )
    return {
        "model": model.state_dict(),
        **opt,
        "rng": rngs,
        **pos,
        "config": plain_config(config),
        "reason": reason,
        "skipped_steps": skipped,
        "fastssl_version": __version__,  # (the fastssl that wrote it)
    }


def save(
    path: str,
    reason: str,
    position: RunState,
    *,
    model: torch.nn.Module,
    optim: Optional[Tuple],
    config,
    d: "dist.DistInfo",
    log,
    fault=None,
) -> bool:
    """The training loop's checkpoint, called by every rank: all ranks' RNG states are gathered
    and rank 0 writes ``contents(...)`` to ``path`` atomically.  Returns False on every rank
    when the write failed (said on ``log``; the previous checkpoint is intact).  ``fault``: a
    ``signals.FaultInjection``, whose ``FASTSSL_FAIL_CKPT_AT_STEP`` makes the write fail half way."""
    rngs = [rng_state()]
    if d.world > 1:
        rngs = [None] * d.world
        torch.distributed.all_gather_object(rngs, rng_state())
    error = None
    if d.is_main:
        try:
            save_atomic(
                contents(model, optim, rngs, position, config, reason),
                path,
                fail_after_bytes=4096 if fault is not None and fault.ckpt_fails(position.step) else None,
            )
        except OSError as e:
            error = e
            log.write(
                f"fastssl: cannot write the checkpoint at step {position.step} ({e}); "
                f"the previous checkpoint {path} is intact"
            )
    return not dist.any_rank(error is not None, d.device)


def resume(path: str, model: torch.nn.Module) -> Dict[str, Any]:
    """The checkpoint at ``path``, its weights loaded into ``model``.  A CheckpointError's
    message (to print after "fastssl: ") says why it cannot be: unreadable, or another model."""
    try:
        ck = load(path)
        model.load_state_dict(ck["model"])
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    except RuntimeError as e:  # (load_state_dict: missing, unexpected or mis-shaped tensors)
        raise CheckpointError(f"{path} does not fit this config's model: {str(e).splitlines()[0]}") from None
    return ck


def plain_config(config):
    """The run's config as plain dicts and lists, as checkpoints keep it: a pickled DictConfig would
    name the dataclass of every section, and a checkpoint would stop loading when one moves."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config


def config_changes(saved, current, limit: int = 8) -> List[str]:
    """The settings in which ``current`` differs from the config ``saved`` in a checkpoint, as
    ``key: old -> new`` lines (at most ``limit``, then a count): a resumed run continues with
    ``current``, so a changed value, or a default changed by a new fastssl version when the run
    is resumed from its YAML file instead of ``out_dir/config.yaml``, is said before the first step."""

    def flat(c, prefix=""):
        out = {}
        for k, v in c.items() if isinstance(c, dict) else ():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(plain_config(saved)), flat(plain_config(current))
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, "<absent>") != new.get(k, "<absent>")]
    lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def restore_rng(ck: Dict[str, Any], rank: int) -> None:
    """This rank's RNG state from ``ck`` (rank 0's when the checkpoint was written by fewer ranks)."""
    set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])


def restore_stage(ck: Dict[str, Any], optim: Tuple, rank: int) -> None:
    """Continue the resumed stage: its (optimizer, scheduler, grad scaler) states, absent from a
    checkpoint at a stage's start, and this rank's RNG state."""
    if "optimizer" in ck:
        for obj, key in zip(optim, ("optimizer", "scheduler", "scaler")):
            obj.load_state_dict(ck[key])
    restore_rng(ck, rank)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
