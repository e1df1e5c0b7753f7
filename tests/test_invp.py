"""Invariance Propagation: graph, propagation, hard sampling and losses against direct
computations; bank and graph through checkpoints and 2-process DDP."""

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (
    ROOT,
    eval_trained_and_random,
    kill_and_resume,
    load_ckpt,
    read_metrics,
    run,
    step_records,
    train_cmd,
)
from fastssl.losses.bank_loss import hardest_positives, invp_losses
from fastssl.methods.invp import knn_graph, propagate

CFG = "configs/invp/builtin.yaml"


def bfs(graph, start, steps):
    seen, q = {start: 0}, deque([start])
    while q:
        u = q.popleft()
        if seen[u] == steps:
            continue
        for v in graph[u]:
            if v not in seen:
                seen[v] = seen[u] + 1
                q.append(v)
    return set(seen) - {start}


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_propagation_equals_breadth_first_search(steps):
    hand = [[1, 2], [2, 3], [0, 4], [5, 5], [4, 0], [3, 1]]  # cycles, self-loops-to-be, duplicates
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 40, (40, 3)).tolist()
    for g in (hand, rand):
        graph = torch.tensor(g)
        anchors = torch.arange(len(g))
        got = propagate(graph, anchors, steps)
        for a in range(len(g)):
            row = got[a]
            vals = row[row >= 0].tolist()
            assert len(vals) == len(set(vals))  # deduplicated
            assert set(vals) == bfs(g, a, steps), (a, steps)


def test_knn_graph_faiss_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    got = knn_graph(bank, 4)
    sims = bank @ bank.t()
    sims.fill_diagonal_(-2)
    want = sims.topk(4, dim=1).indices
    assert torch.equal(got, want)
    assert not (got == torch.arange(300)[:, None]).any()


def test_hard_positive_and_negative_selection():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.5, 4.0, 2.0]])
    valid = torch.tensor([[True, True, True, False, True, True]])
    keep = hardest_positives(logits, valid, 2)  # least similar valid: 1.0 (col 1) and 2.0 (col 5)
    assert keep.nonzero()[:, 1].tolist() == [1, 5]
    assert torch.equal(hardest_positives(logits, valid, 0), valid)
    # background = the K nearest: check through the loss with K = 2 on a hand-made row
    lg = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # self = 0, not among the top-2 (cols 1, 3)
    l_ins, _ = invp_losses(lg, torch.tensor([0]), torch.tensor([[2]]), background=2, hard_positives=0)
    want = np.log(np.exp(3.0) + np.exp(2.0) + np.exp(0.0)) - 0.0
    assert l_ins.item() == pytest.approx(want, rel=1e-6)


def numpy_losses(f, bank, self_idx, pos, K, P, tau):
    """The METHODS.md formulas, written out: s = exp(cos / tau)."""
    s = np.exp(f @ bank.T / tau)
    out_ins, out_inv = [], []
    for i in range(len(f)):
        top = np.argsort(-s[i])[:K] if K else np.arange(len(bank))
        bg = set(top.tolist()) | {self_idx[i]}
        z = sum(s[i, j] for j in bg)
        out_ins.append(-np.log(s[i, self_idx[i]] / z))
        p = [j for j in pos[i] if j >= 0]
        if P:
            p = sorted(p, key=lambda j: s[i, j])[:P]
        out_inv.append(-np.log(sum(s[i, j] for j in p) / (z - s[i, self_idx[i]])))
    return np.array(out_ins), np.array(out_inv)


@pytest.mark.parametrize("K,P", [(8, 3), (0, 0), (5, 0), (0, 2)])
def test_losses_equal_numpy(K, P):
    g = torch.Generator().manual_seed(K * 10 + P)
    bank = F.normalize(torch.randn(30, 6, generator=g, dtype=torch.float64), dim=1)
    f = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    idx = torch.tensor([3, 7, 11, 29])
    pos = torch.tensor([[1, 2, 5, -1], [0, 9, 12, 13], [4, -1, -1, -1], [8, 6, 2, 1]])
    l_ins, l_inv = invp_losses(f @ bank.t() / 0.1, idx, pos, K, P)
    w_ins, w_inv = numpy_losses(f.numpy(), bank.numpy(), idx.numpy(), pos.numpy(), K, P, 0.1)
    np.testing.assert_allclose(l_ins.numpy(), w_ins, rtol=1e-9)
    np.testing.assert_allclose(l_inv.numpy(), w_inv, rtol=1e-9)


def test_rows_without_positives_are_left_out():
    lg = torch.randn(2, 10)
    _, l_inv = invp_losses(lg, torch.tensor([0, 1]), torch.tensor([[-1, -1], [3, -1]]), 0, 0)
    assert torch.isnan(l_inv[0]) and torch.isfinite(l_inv[1])


def test_bank_update_is_ema_and_renormalised(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(config=f"{ROOT}/{CFG}")
    m = get_method("invp")(cfg, build_backbone(cfg.model, 32), 32, 512)
    assert torch.allclose(m.bank.norm(dim=1), torch.ones(512))
    m.begin_epoch(0, fresh=True)
    before = m.bank.clone()
    idx = torch.tensor([5, 9, 100])
    out = m([torch.randn(3, 3, 32, 32)], idx)
    f = m._pending[0].clone()
    m.after_step()
    want = F.normalize(0.5 * before[idx] + 0.5 * f, dim=1)
    torch.testing.assert_close(m.bank[idx], want)
    untouched = torch.ones(512, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(m.bank[untouched], before[untouched])
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["method.positives=knn", "method.hard_positives=0", "method.background=0"])
def test_ablations_run(tmp_path, ablation):
    out = tmp_path / "abl"
    run(train_cmd(out, ablation, "train.max_steps=6", "method.rampup_epoch=0", "data.batch_size=64", config=CFG))
    recs = step_records(out)
    assert all(np.isfinite(r["loss"]) for r in recs) and recs[-1]["loss_inv"] > 0


@pytest.mark.slow
def test_bank_and_graph_survive_kill_and_resume(tmp_path):
    common = [
        "train.epochs=3",
        "train.ckpt_every_steps=3",
        "data.batch_size=64",
        "method.rampup_epoch=1",
    ]  # 8 steps/epoch
    ref, _, resumed, _ = kill_and_resume(tmp_path, common, CFG, (10, 23))
    a, b = ref["model"], resumed["model"]
    assert {"bank", "graph"} <= set(a)
    assert (a["graph"] >= 0).all()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.ddp
def test_bank_consistent_under_two_process_ddp(tmp_path):
    out = tmp_path / "ddp"
    run(train_cmd(out, "train.epochs=2", "data.batch_size=32", "method.rampup_epoch=1", config=CFG, nproc=2))
    recs = read_metrics(out)
    mon = [r for r in recs if "bank_consistent" in r]
    assert len(mon) == 2 and all(r["bank_consistent"] == 1.0 for r in mon)
    assert all(0 <= r["knn_monitor"] <= 100 for r in mon)  # (the generic monitor, on rank 0)
    bank = load_ckpt(out / "checkpoints" / "last.pt")["model"]["bank"]
    assert torch.allclose(bank.norm(dim=1), torch.ones(len(bank)), atol=1e-5)


def test_fingerprint_sees_rows_moved_in_a_normalised_bank():
    from fastssl.dist import fingerprint

    bank = F.normalize(torch.randn(50, 16), dim=1)
    moved = bank.clone()
    moved[[3, 7]] = moved[[7, 3]]
    a, b = fingerprint([bank]), fingerprint([moved])
    assert torch.allclose(a[:, :2], b[:, :2])  # sum and sum of squares cannot tell them apart
    assert not torch.equal(a, b)


def _check_bank(rank, store, out):
    import torch.distributed as dist

    from fastssl.dist import same_on_all_ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    bank = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    graph = torch.arange(80).view(40, 2)
    same = same_on_all_ranks([bank, graph], torch.device("cpu"))
    if rank == 1:  # the same rows, two of them swapped on one rank
        bank[[0, 1]] = bank[[1, 0]]
    out.put((rank, same, same_on_all_ranks([bank, graph], torch.device("cpu"))))
    dist.destroy_process_group()


def test_same_on_all_ranks_under_two_process_gloo(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_check_bank, args=(r, tmp_path / "store", out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [(0, True, False), (1, True, False)]


@pytest.mark.slow
def test_graph_with_approximate_index_runs(tmp_path):
    out = tmp_path / "hnsw"
    run(
        train_cmd(
            out,
            "method.graph_index=hnsw",
            "train.max_steps=9",
            "data.batch_size=64",
            "method.rampup_epoch=0",
            config=CFG,
        )
    )
    g = load_ckpt(out / "checkpoints" / "last.pt")["model"]["graph"]
    assert (g >= 0).all() and not (g == torch.arange(len(g))[:, None]).any()


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.color.value=[0.5]", "method.color.value"),
        ("method.color.hue=200", "method.color.hue"),
        ("method.graph_index=lsh", "method.graph_index"),
        ("method.background=-1", "method.background"),
        ("method.blur=1.5", "method.blur"),
        ("method.blur=0.5 method.blur_sigma=[0,1]", "method.blur_sigma"),  # (read only when views are blurred)
        ("method.blur=0.5 method.blur_kernel=4", "method.blur_kernel"),
    ],
)
def test_bad_settings_are_refused(tiny_cfg, override, key):
    from fastssl.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(*override.split(), config=f"{ROOT}/{CFG}")
    assert str(e.value).startswith(key)


def test_blur_is_in_the_recipe_only_when_on_and_its_window_is_the_odd_side_nearest_a_tenth(tiny_cfg):
    from fastssl.data.ops import Blur
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    def recipe(*over, size=32):
        cfg = tiny_cfg(*over, f"data.builtin.image_size={size}", config=f"{ROOT}/{CFG}")
        return get_method("invp")(cfg, build_backbone(cfg.model, size), size).recipe()

    assert not recipe().has(Blur) and "blur" not in recipe().draw(np.random.default_rng(0), 8)
    on = recipe("method.blur=0.5", size=96)
    assert [op.kernel for op in on.ops if isinstance(op, Blur)] == [9]  # 96 px: 9.6 -> 9
    sigma = on.draw(np.random.default_rng(0), 4000)["blur"]
    assert sigma.shape == (4000, 1) and 0.45 < (sigma > 0).mean() < 0.55 and sigma[sigma > 0].min() >= 0.1
    assert [op.kernel for op in recipe("method.blur=0.5", "method.blur_kernel=5").ops if isinstance(op, Blur)] == [5]
    # drawn last: the other fields keep their streams
    off, with_blur = (
        recipe().draw(np.random.default_rng(1), 64),
        recipe("method.blur=0.5").draw(np.random.default_rng(1), 64),
    )
    assert all(np.array_equal(off[k], with_blur[k]) for k in off)


@pytest.mark.slow
@pytest.mark.learning
def test_builtin_learn_run_beats_random_init(tmp_path):
    """configs/invp/builtin-learn.yaml (400 steps) against the same network untrained, under the
    kNN monitor (mean of the last 10 epochs against its random-init level, probed before step 0)
    and the linear probe."""
    cfg = f"{ROOT}/configs/invp/builtin-learn.yaml"
    out = tmp_path / "learn"
    run(train_cmd(out, config=cfg, tiny=False), timeout=1200)
    recs = read_metrics(out)
    knn = [r["knn_monitor"] for r in recs if "knn_monitor" in r]
    (base,) = [r["knn_monitor_init"] for r in recs if "knn_monitor_init" in r]
    assert len(knn) == 100
    assert np.mean(knn[-10:]) >= base + 5, (knn[-10:], base)
    trained, random = eval_trained_and_random(out, "linear")
    assert trained["accuracy"] >= random["accuracy"] + 10, (trained, random)
