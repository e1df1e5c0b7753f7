"""The evaluation harness: repeated runs with a ledger, the one supervised training loop (bit for
bit the loops finetune and transfer had), and the protocol registry."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.errors import ConfigError
from fastssl.eval.finetune import _augment
from fastssl.eval.harness import (
    PROTOCOLS,
    batch_starts,
    get_protocol,
    percent_correct,
    protocol,
    repeat_runs,
    train_supervised,
)
from fastssl.eval.ledger import Ledger, Preempted

# --------------------------------------------------------------------------- repeat_runs


def test_repeat_runs_skips_recorded_runs_and_records_each_new_one_at_once(tmp_path):
    path = str(tmp_path / "p.json")
    Ledger(path).add(1, 50.0)  # run 1 finished before a pre-emption
    ledger = Ledger(path, resume=True)
    done, logged = [], []

    def run(k):
        done.append(k)
        with open(path) as f:  # the runs before this one are on disk already
            assert sorted(json.load(f)["runs"]) == sorted(str(j) for j in {1, *range(k)})
        return {0: 10.0, 2: 30.0, 3: 45.5}[k]

    res = repeat_runs(4, run, ledger, logged.append, lambda k, acc: f"run {k}: {acc}", labels=7)
    assert done == [0, 2, 3] and logged == ["run 0: 10.0", "run 2: 30.0", "run 3: 45.5"]
    accs = [10.0, 50.0, 30.0, 45.5]
    assert res == {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs, "labels": 7}
    assert Ledger(path, resume=True).runs == dict(enumerate(accs))


def test_repeat_runs_without_a_ledger_runs_all_and_logs_nothing_without_a_message():
    res = repeat_runs(3, lambda k: float(k), log=lambda s: pytest.fail(s))
    assert res == {"accuracy": 1.0, "std": float(np.std([0.0, 1.0, 2.0])), "runs": [0.0, 1.0, 2.0]}


def test_batch_starts():
    assert list(batch_starts(50, 16)) == [0, 16, 32, 48]
    assert list(batch_starts(50, 16, drop_last=True)) == [0, 16, 32]
    assert list(batch_starts(10, 16, drop_last=True)) == [0]  # fewer images than a batch: one batch of all


# --------------------------------------------------------------------------- train_supervised


class CountingLedger(Ledger):
    checks = 0

    def check(self):
        self.checks += 1


def _tiny_net():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )


def _data(n):
    g = torch.Generator().manual_seed(9)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _assert_same_weights(a, b):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


@pytest.mark.parametrize("n", [50, 10])  # drop-last batches; fewer images than a batch
def test_train_supervised_is_the_finetune_loop(n):
    x, y, epochs, bs, seed = *_data(n), 3, 16, 4
    ref = _tiny_net()
    # the loop fastssl/eval/finetune.py had
    opt = _sgd(ref)
    steps = epochs * max(1, len(x) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        ref.train()
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x) - bs + 1 if len(x) >= bs else 1, bs):
            b = perm[s : s + bs]
            loss = F.cross_entropy(ref(_augment(x[b], g)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net, ledger = _tiny_net(), CountingLedger()
    train_supervised(
        net,
        x,
        y,
        epochs,
        bs,
        "cpu",
        make_opt=_sgd,
        schedule=torch.optim.lr_scheduler.CosineAnnealingLR,
        drop_last=True,
        augment=_augment,
        generator=torch.Generator().manual_seed(seed),
        ledger=ledger,
    )
    _assert_same_weights(net, ref)
    assert ledger.checks == epochs


def test_train_supervised_is_the_transfer_loop():
    x, y, epochs, bs = *_data(50), 4, 16
    switch = int(round(2 * epochs / 3))
    adam = lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)  # noqa: E731
    ref = _tiny_net()
    ref[0].weight.requires_grad_(False)  # a frozen first layer
    # the loop fastssl/eval/transfer.py had: the global RNG, seeded before the run
    torch.manual_seed(1000)
    opt = adam(ref)
    for ep in range(epochs):
        if ep == switch:
            for gr in opt.param_groups:
                gr["lr"] = 1e-4
        ref.train()
        perm = torch.randperm(len(x))
        for s in range(0, len(x), bs):
            b = perm[s : s + bs]
            loss = F.cross_entropy(ref(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net = _tiny_net()
    net[0].weight.requires_grad_(False)
    torch.manual_seed(1000)
    train_supervised(net, x, y, epochs, bs, "cpu", make_opt=adam, epoch_lr=lambda ep: 1e-3 if ep < switch else 1e-4)
    _assert_same_weights(net, ref)


def test_train_supervised_stops_at_an_epoch_start_when_asked():
    class Stop:
        name, requested = "SIGTERM", True

    with pytest.raises(Preempted, match="SIGTERM"):
        train_supervised(_tiny_net(), *_data(8), 2, 4, "cpu", make_opt=_sgd, ledger=Ledger(stop=Stop()))


def test_percent_correct():
    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert percent_correct(net, [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([1]))], 3) == 100.0 * 2 / 3
    assert not net.training


# --------------------------------------------------------------------------- the registry


def test_registry_lists_the_protocols_and_rejects_an_unknown_one(capsys):
    from fastssl.eval.__main__ import evaluate, parse_args

    assert list(PROTOCOLS) == ["linear", "knn", "finetune", "transfer", "svm-folds"]
    with pytest.raises(ConfigError, match="unknown protocol 'bogus'.*linear, knn, finetune, transfer, svm-folds"):
        get_protocol("bogus")
    with pytest.raises(ConfigError, match="'bogus'"):  # before any data is read
        evaluate(None, "bogus", None, torch.device("cpu"))
    with pytest.raises(SystemExit) as e:  # the command line: argparse's own error, as before the registry
        parse_args(["--protocol", "bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_a_registered_protocol_is_dispatched():
    @protocol("test-only")
    def fake(job):
        return {"accuracy": 1.0, "job": job}

    try:
        assert get_protocol("test-only") is fake
    finally:
        del PROTOCOLS["test-only"]
    assert "test-only" not in PROTOCOLS


def test_eval_modules_take_config_error_from_the_leaf_module():
    import ast
    import os

    import fastssl.eval

    root = os.path.dirname(fastssl.eval.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "fastssl.config":
                    assert "ConfigError" not in [a.name for a in node.names], name


class _StopAfterFirstRun:
    """A stop request that turns true once the ledger holds one finished run."""

    name = "TEST-STOP"

    def __init__(self):
        self.ledger = None

    @property
    def requested(self):
        return len(self.ledger.runs) >= 1


@pytest.mark.parametrize(
    "protocol, overrides",
    [
        ("finetune", ["eval.finetune_epochs=1", "eval.finetune_labels=100", "eval.finetune_seeds=2"]),
        ("linear", ["eval.linear_epochs=2", "eval.linear_seeds=2"]),
    ],
)
def test_a_resumed_evaluation_equals_an_uninterrupted_one(tmp_path, protocol, overrides):
    """Stopped after its first run and resumed from the ledger, a protocol gives the uninterrupted
    result: each run draws from its own seed (finetune's new head included: it used to come from
    the global RNG, so a resumed seed 1 started from another head)."""
    import torch

    from conftest import ROOT, TINY
    from fastssl.config import load_config
    from fastssl.eval.__main__ import evaluate
    from fastssl.eval.ledger import Ledger, Preempted

    cfg = load_config(f"{ROOT}/configs/sc/builtin.yaml", TINY + overrides)
    quiet = lambda *a: None  # noqa: E731
    whole = evaluate(cfg, protocol, None, torch.device("cpu"), log=quiet)
    stop = _StopAfterFirstRun()
    stop.ledger = Ledger(str(tmp_path / "p.json"), stop)
    with pytest.raises(Preempted):
        evaluate(cfg, protocol, None, torch.device("cpu"), log=quiet, ledger=stop.ledger)
    resumed = evaluate(
        cfg, protocol, None, torch.device("cpu"), log=quiet, ledger=Ledger(str(tmp_path / "p.json"), None, resume=True)
    )
    assert resumed == whole and len(whole["runs"]) == 2
