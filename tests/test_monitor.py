"""The online kNN monitor: logged for every method with labels, bounded, and read-only."""

import numpy as np
import pytest
import torch

from conftest import epoch_records, load_ckpt, run, train_cmd

CONFIGS = {"sc": [], "layerwise": [], "invp": [], "splitbrain": [], "exemplar": ["method.num_classes=64"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", CONFIGS)
def test_monitor_logged_for_every_method(tmp_path, method):
    out = tmp_path / "run"
    p = run(
        train_cmd(
            out,
            "train.epochs=2",
            "train.monitor_bank=100",
            "train.monitor_test=50",
            "data.batch_size=64",
            "train.tensorboard=true",
            *CONFIGS[method],
            config=f"configs/{method}/builtin.yaml",
        )
    )
    recs = epoch_records(out, "knn_monitor")
    assert len(recs) >= 2 and all(0 <= r["knn_monitor"] <= 100 and r["monitor_s"] > 0 for r in recs)
    assert any(f.name.startswith("events") for f in (out / "tb").iterdir())  # and in TensorBoard
    lines = p.stdout.splitlines()  # the run's first banner comes before the step-0 monitor line
    banner = next(i for i, x in enumerate(lines) if x.startswith(f"fastssl: {method} on "))
    assert banner < next(i for i, x in enumerate(lines) if "knn_monitor_init" in x), p.stdout[-2000:]


def test_monitor_bank_is_bounded_fixed_and_on_the_device(tiny_cfg):
    from fastssl.data.sources import build_source
    from fastssl.engine.monitors import KNNMonitor
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg("train.monitor_bank=77", "train.monitor_test=33")
    source = build_source(cfg)
    cls = get_method("sc")
    model = cls(cfg, build_backbone(cfg.model, 32), 32, len(source.pretrain))
    mon = KNNMonitor.build(cfg, source, cls, torch.device("cpu"))
    again = KNNMonitor.build(cfg, source, cls, torch.device("cpu"))
    assert len(mon.bank_index) == 77 and len(np.unique(mon.bank_index)) == 77
    assert np.array_equal(mon.bank_index, again.bank_index)  # a fixed subset, from the seed
    out = mon(model)
    assert mon.bank.shape == (77, model.backbone.dim()) and mon.bank.device.type == "cpu"
    assert 0 <= out["knn_monitor"] <= 100 and model.training  # train mode restored


def test_monitor_off_without_labels_or_when_asked(tiny_cfg):
    from fastssl.data.sources import build_source
    from fastssl.engine.monitors import KNNMonitor
    from fastssl.methods import get_method

    cfg = tiny_cfg("train.monitor_every=0")
    assert KNNMonitor.build(cfg, build_source(cfg), get_method("sc"), torch.device("cpu")) is None


@pytest.mark.slow
def test_monitor_changes_nothing_in_training(tmp_path):
    """The same run with and without the monitor ends with bit-identical parameters (the demo's
    numbers are kept)."""
    outs = {}
    for every in (1, 0):
        outs[every] = tmp_path / f"m{every}"
        run(train_cmd(outs[every], "train.epochs=2", f"train.monitor_every={every}"))
    a, b = (load_ckpt(outs[e] / "checkpoints" / "last.pt")["model"] for e in (1, 0))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert epoch_records(outs[1], "knn_monitor") and not epoch_records(outs[0], "knn_monitor")


def test_bad_monitor_values_are_refused(tiny_cfg):
    from fastssl.config import ConfigError

    for bad, key in (("train.monitor_every=-1", "train.monitor_every"), ("train.monitor_bank=0", "train.monitor_bank")):
        with pytest.raises(ConfigError, match=key):
            tiny_cfg(bad)
