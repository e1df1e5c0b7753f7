"""Evaluation protocols: FAISS kNN equals brute force, the probes learn, the CLI writes JSON."""

import json

import numpy as np
import pytest
import torch

from conftest import PY, run, train_cmd
from fastssl.config import EvalConfig
from fastssl.eval.linear import linear_probe
from fastssl.knn import KNNIndex
from fastssl.knn.classify import knn_accuracy, knn_classify


def test_faiss_neighbours_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(997, 33, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(51, 33, generator=g), dim=1)
    sims, idx = KNNIndex(db, "ip").search(q, 10)
    want_s, want_i = (q @ db.t()).topk(10, dim=1)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(sims, want_s, atol=1e-5, rtol=0)
    d2, idx2 = KNNIndex(db, "l2").search(q, 5)
    want_d, want_i2 = torch.cdist(q, db).pow(2).topk(5, dim=1, largest=False)
    assert torch.equal(idx2, want_i2)


def test_weighted_knn_vote_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    xtr, ytr = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    xte = torch.randn(40, 8, generator=g)
    pred = knn_classify(xtr, ytr, xte, 4, k=20, temperature=0.1)
    a, b = torch.nn.functional.normalize(xte, dim=1), torch.nn.functional.normalize(xtr, dim=1)
    s, i = (a @ b.t()).topk(20, dim=1)
    votes = torch.zeros(40, 4).scatter_add_(1, ytr[i], (s / 0.1).exp())
    assert torch.equal(pred, votes.argmax(1))


def test_probes_separate_separable_features():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(5, 16, generator=g) * 3
    ytr, yte = torch.randint(0, 5, (500,), generator=g), torch.randint(0, 5, (200,), generator=g)
    xtr = centers[ytr] + torch.randn(500, 16, generator=g)
    xte = centers[yte] + torch.randn(200, 16, generator=g)
    lin = linear_probe(xtr, ytr, xte, yte, EvalConfig(linear_epochs=20, linear_seeds=2), num_classes=5)
    assert lin["accuracy"] > 95 and len(lin["runs"]) == 2
    assert knn_accuracy(xtr, ytr, xte, yte, 5, k=20)["accuracy"] > 95
    noise = linear_probe(
        torch.randn(500, 16), ytr, torch.randn(200, 16), yte, EvalConfig(linear_epochs=5, linear_seeds=1), num_classes=5
    )
    assert noise["accuracy"] < 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(train_cmd(out, "train.max_steps=4"))
    return out / "checkpoints" / "last.pt"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["linear", "knn", "finetune"])
def test_eval_cli_writes_json(checkpoint, protocol, tmp_path):
    out = tmp_path / f"{protocol}.json"
    p = run(
        [
            PY,
            "-m",
            "fastssl.eval",
            "--checkpoint",
            str(checkpoint),
            "--protocol",
            protocol,
            "--out",
            str(out),
            "eval.linear_epochs=3",
            "eval.linear_seeds=2",
            "eval.finetune_epochs=1",
            "eval.finetune_labels=100",
        ]
    )
    res = json.loads(out.read_text())
    assert res["protocol"] == protocol and 0 <= res["accuracy"] <= 100 and not res["random_init"]
    assert f"{protocol} accuracy" in p.stdout
    if protocol == "linear":
        assert len(res["runs"]) == 2
    if protocol == "finetune":
        assert res["labels"] == 100


@pytest.mark.slow
def test_random_init_and_bad_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    run(
        [
            PY,
            "-m",
            "fastssl.eval",
            "--checkpoint",
            str(checkpoint),
            "--protocol",
            "knn",
            "--random-init",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["random_init"] is True
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    p = run([PY, "-m", "fastssl.eval", "--checkpoint", str(bad), "--protocol", "knn"], check=False)
    assert p.returncode == 2 and "corrupt" in p.stderr and "Traceback" not in p.stderr


def test_balanced_subset_is_balanced():
    from fastssl.eval.finetune import balanced_subset

    y = np.repeat(np.arange(10), 50)
    idx = balanced_subset(y, 40, 10, seed=0)
    assert np.bincount(y[idx]).tolist() == [4] * 10
    assert not np.array_equal(idx, balanced_subset(y, 40, 10, seed=1))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indices_find_most_true_neighbours(kind):
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(20, 32, generator=g)
    db = torch.nn.functional.normalize(
        centers[torch.randint(0, 20, (2000,), generator=g)] + 0.3 * torch.randn(2000, 32, generator=g), dim=1
    )
    q = db[:100]
    _, approx = KNNIndex(db, "ip", kind=kind).search(q, 10)
    _, exact = KNNIndex(db, "ip").search(q, 10)
    recall = np.mean([len(set(a.tolist()) & set(e.tolist())) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.8, recall
    with pytest.raises(ValueError, match="index kind"):
        KNNIndex(db, "ip", kind="lsh")
