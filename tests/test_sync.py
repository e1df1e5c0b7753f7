"""A steady-state training step reads nothing from the device on the host (fastssl/engine/sync.py).

Each of these operations waits for the GPU when its tensor lives there: ``.item()``,
``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.numpy()``, ``.cpu()``, ``nonzero``,
boolean-mask indexing, ``unique``, ``repeat_interleave`` without ``output_size``...  Without a GPU
the test counts them (a ``TorchFunctionMode``) over whole in-process training runs of 2 and of 6
steps inside one epoch, with no logging, checkpoint or monitor step before the last: the count
must not grow with the number of steps.  Reads inside ``sync.intended_read`` (logging steps, the
flags of a finished step) and the host data pipelines' own work on host memory (``fastssl/data``
outside the tensor executor, DALI, DataLoader workers) are not counted.
"""

import os
import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT, TINY
from fastssl import train
from fastssl.engine import sync

pytestmark = pytest.mark.slow

SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero"}
SYNC_FUNCTIONS = {"nonzero", "unique", "masked_select", "argwhere", "unique_consecutive"}
HOST_SIDE = (os.path.join(ROOT, "fastssl", "data") + os.sep, os.sep + "nvidia" + os.sep + "dali" + os.sep)
DEVICE_SIDE = (os.path.join(ROOT, "fastssl", "data", "executors", "tensor.py"),)


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


def _is_sync(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in SYNC_METHODS or name in SYNC_FUNCTIONS:
        return True
    if name == "to":  # (``.to(device)`` with the training device is no read: only an explicit "cpu" is)
        dev = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(dev, str) and torch.device(dev).type == "cpu"
    if name == "repeat_interleave":
        return "output_size" not in kwargs
    if name == "where":
        return len(args) == 1
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        return _bool_index(args)
    return False


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensors by their call site (file:line of the first fastssl frame)."""

    def __init__(self):
        super().__init__()
        self.sites = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not sync.reading_intended() and _is_sync(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "torch" + os.sep + "overrides" not in f.filename]
            ours = [f for f in frames if f.filename.startswith(os.path.join(ROOT, "fastssl"))]
            host = any(f.filename.startswith(HOST_SIDE) and f.filename not in DEVICE_SIDE for f in frames)
            if ours and not host:
                site = ours[-1]
                self.sites[f"{os.path.relpath(site.filename, ROOT)}:{site.lineno} {func.__name__}"] += 1
        return func(*args, **kwargs)


def host_reads(tmp_path, config, steps, *overrides):
    config, *more = config.split()
    args = [
        "--config",
        os.path.join(ROOT, config),
        *more,
        f"out_dir={tmp_path / str(steps)}",
        *TINY,
        f"train.max_steps={steps}",
        "train.log_every_steps=1000",
        "train.ckpt_every_steps=1000",
        "train.monitor_every=0",
        "train.tensorboard=false",
        "data.pipeline=tensor",
        "optim.impl=fused",  # (the GPU's optimisers; foreach on the CPU reads its step count with .item())
        *overrides,
    ]
    with SyncCounter() as counter:
        assert train.main(args) == 0
    return counter.sites


CONFIGS = [
    "configs/sc/builtin.yaml",
    "configs/layerwise/builtin.yaml",
    "configs/invp/builtin.yaml",
    "configs/splitbrain/builtin.yaml",
    "configs/exemplar/builtin.yaml method.num_classes=64",
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.split("/")[1])
def test_host_reads_do_not_grow_with_the_steps(tmp_path, config):
    few, many = host_reads(tmp_path, config, 2), host_reads(tmp_path, config, 6)
    grew = {site: (few.get(site, 0), n) for site, n in many.items() if n > few.get(site, 0)}
    assert not grew, f"host reads per call site (2 steps, 6 steps) that grow with the steps: {grew}"


def test_the_counter_sees_the_old_per_step_read(tmp_path, monkeypatch):
    """The check can fail: the flags read on the host at every step (what train.py did before
    engine/sync.py) is counted at every step."""
    cast = sync.Votes.cast

    def cast_and_read(self, step, skip, stop):
        cast(self, step, skip, stop)
        skip.tolist()

    monkeypatch.setattr(sync.Votes, "cast", cast_and_read)
    few, many = host_reads(tmp_path, CONFIGS[0], 2), host_reads(tmp_path, CONFIGS[0], 6)
    assert {s: many[s] - few.get(s, 0) for s in many if many[s] > few.get(s, 0)} == {
        next(s for s in many if s.startswith("fastssl/train.py") and s.endswith(" tolist")): 4
    }
