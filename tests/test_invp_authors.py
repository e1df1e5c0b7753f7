"""Invariance Propagation against the authors' released code, transcribed.

The ``authors_*`` functions below are transcriptions (torch, same operations, same order) of
github.com/WangFeng18/InvariancePropagation, file ``objective.py``, class
``InvariancePropagationLoss``: ``propagate`` (the positives: concatenated neighbour lists),
``update_nn`` (the per-step neighbour refresh) and ``forward`` (L_ins = lossA, L_inv = lossB,
hard positives by ``topk``), with ``MemoryBank_v1.get_all_dot_products``; and of ``main.py``'s
optimiser (SGD over ``network.parameters()``: every parameter decayed).  fastssl's own code
(``fastssl.knn.graph``, ``fastssl.kernels.bank_loss``, ``fastssl.methods.invp``) is compared with
them on identical random inputs: the authors' switches (``method.positives=authors``,
``method.graph_refresh=step``, ``method.hard_mode=most_similar``,
``method.weight_decay_scope=all``) must give their values (fp32, 1e-5), fused kernel
(TRITON_INTERPRET on the CPU) and eager alike.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run, step_records, train_cmd
from fastssl.kernels.bank_loss import bank_loss_fused
from fastssl.knn.graph import knn_graph, propagate, refresh_neighbours
from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager

CFG = "configs/invp/builtin.yaml"
AUTHORS_EPS = 1e-7  # objective.py: -(ratio + 1e-7).log(); fastssl computes -log(ratio) in log space


# ----------------------------------------------------------------------------- the transcription
# WangFeng18/InvariancePropagation, objective.py, class InvariancePropagationLoss (and
# MemoryBank_v1.neigh / get_all_dot_products); the names are theirs.


def authors_propagate(neigh, point_indices, diffusion_layer):
    """InvariancePropagationLoss.propagate: the neighbour lists of every node reached, appended
    column by column, layer by layer (no deduplication; the anchor is not removed)."""
    cur_point = 0
    matrix = neigh[point_indices]  # 256 x 4
    end_point = matrix.size(1) - 1
    layer = 2
    while layer <= diffusion_layer:
        current_nodes = matrix[:, cur_point]
        sub_matrix = neigh[current_nodes]
        matrix = torch.cat([matrix, sub_matrix], dim=1)
        if cur_point == end_point:
            layer += 1
            end_point = matrix.size(1) - 1
        cur_point += 1
    return matrix


def authors_update_nn(background_indices, point_indices, k):
    """InvariancePropagationLoss.update_nn: the new memory_bank.neigh rows of the batch."""
    nei = background_indices[:, : k + 1]
    condition = nei == point_indices.unsqueeze(dim=1)
    backup = nei[:, k : k + 1].expand_as(nei)
    nei_exclusive = torch.where(condition, backup, nei)
    return nei_exclusive[:, :k]


def authors_forward(
    points,
    point_indices,
    bank,
    neigh,
    t,
    n_background,
    diffusion_layer,
    k,
    n_pos,
    hard_pos=True,
    exclusive=True,
    eps=AUTHORS_EPS,
    reduce=True,
):
    """InvariancePropagationLoss.forward (InvP=True): (lossA, lossB, new neigh rows).
    ``reduce=False``: the per-row terms before ``.mean()``; ``eps``: their 1e-7."""
    norm_points = points / torch.sqrt(torch.sum(points**2, dim=1).unsqueeze(1))  # l2_normalize
    all_sim = torch.exp(torch.matmul(norm_points, bank.t()) / t)  # _exp(get_all_dot_products)
    self_sim = all_sim[list(range(all_sim.size(0))), point_indices]
    background_sim, background_indices = all_sim.topk(k=n_background, dim=1, largest=True, sorted=True)
    lossA = -(self_sim / background_sim.sum(dim=1) + eps).log()
    neighs = authors_propagate(neigh, point_indices, diffusion_layer)
    background_exclusive_sim = background_sim.sum(dim=1) - self_sim
    pos_sim = torch.gather(all_sim, index=neighs, dim=1)
    if hard_pos:
        hard_pos_sim, _ = pos_sim.topk(k=min(n_pos, pos_sim.size(1)), dim=1, largest=False, sorted=True)
    else:
        hard_pos_sim, _ = pos_sim.topk(k=min(n_pos, pos_sim.size(1)), dim=1, largest=True, sorted=True)
    if exclusive:
        lossB = -(hard_pos_sim.sum(dim=1) / background_exclusive_sim + eps).log()
    else:
        lossB = -(hard_pos_sim.sum(dim=1) / (background_exclusive_sim + self_sim) + eps).log()
    new_neigh = authors_update_nn(background_indices, point_indices, k)
    if reduce:
        return lossA.mean(), lossB.mean(), new_neigh
    return lossA, lossB, new_neigh


def with_authors_eps(per_row):
    """fastssl's per-row -log(r), as the authors' mean of -log(r + 1e-7)."""
    return (-torch.log(torch.exp(-per_row.double()) + AUTHORS_EPS)).mean().float()


# ----------------------------------------------------------------------------- identical inputs

TAU, K_BG, P, K_NN, STEPS = 0.07, 64, 50, 4, 3


def inputs(seed=0, n=1500, d=32, b=12):
    """A clustered bank (reciprocal neighbours: duplicates and the anchor in the multiset), its
    kNN graph, and batch features near their own entries (self is in the top-K background,
    where the authors' L_ins and fastssl's agree: see docs/fidelity.md)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n // 10, d, generator=g), dim=1)
    bank = F.normalize(centres.repeat_interleave(10, 0) + 0.35 * torch.randn(n, d, generator=g), dim=1)
    index = torch.randperm(n, generator=g)[:b]
    f = F.normalize(bank[index] + 0.15 * torch.randn(b, d, generator=g), dim=1)
    return f, bank, index, knn_graph(bank, K_NN)


def test_positives_multiset_is_the_authors_concatenation():
    f, bank, index, graph = inputs()
    got = propagate(graph, index, STEPS, multiset=True)
    want = authors_propagate(graph, index, STEPS)
    assert got.shape == (len(index), K_NN + K_NN**2 + K_NN**3) == want.shape  # 4 + 16 + 64 = 84
    assert torch.equal(got, want)  # the same entries in the same order
    copies = (got == index[:, None]).sum(1).float()
    assert copies.mean() > 1  # the anchor is in it, several times (every reciprocal neighbour)
    dedup = propagate(graph, index, STEPS)
    for r in range(len(index)):  # today's set = the multiset's distinct entries, anchor removed
        assert set(dedup[r][dedup[r] >= 0].tolist()) == set(got[r].tolist()) - {index[r].item()}
    for steps in (1, 2, 4):
        assert torch.equal(propagate(graph, index, steps, multiset=True), authors_propagate(graph, index, steps))


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("hard_pos", [True, False])
def test_losses_in_authors_mode_equal_the_authors(impl, hard_pos):
    f, bank, index, graph = inputs()
    a_ins, a_inv, _ = authors_forward(
        f, index, bank, graph, TAU, K_BG, STEPS, K_NN, P, hard_pos=hard_pos, eps=0.0, reduce=False
    )
    a_ins_eps, a_inv_eps, _ = authors_forward(f, index, bank, graph, TAU, K_BG, STEPS, K_NN, P, hard_pos=hard_pos)
    pos = propagate(graph, index, STEPS, multiset=True)
    fn = bank_loss_fused if impl == "fused" else bank_loss_eager
    l_ins, l_inv = fn(f, bank, index, pos, BankLossSettings(TAU, K_BG, P, most_similar=not hard_pos))
    torch.testing.assert_close(l_ins, a_ins, rtol=0, atol=1e-5)  # per row, without their 1e-7
    torch.testing.assert_close(l_inv, a_inv, rtol=0, atol=1e-5)
    # their reported values (mean of -log(ratio + 1e-7)) from fastssl's per-row ones
    torch.testing.assert_close(with_authors_eps(l_ins), a_ins_eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_authors_eps(l_inv), a_inv_eps, rtol=0, atol=1e-5)


def test_todays_positives_give_a_different_l_inv():
    """The deduplicated set without the anchor (positives=propagation) is not the authors' term."""
    f, bank, index, graph = inputs()
    _, a_inv, _ = authors_forward(f, index, bank, graph, TAU, K_BG, STEPS, K_NN, P, eps=0.0)
    _, l_inv = bank_loss_eager(f, bank, index, propagate(graph, index, STEPS), BankLossSettings(TAU, K_BG, P))
    assert abs(l_inv.nanmean().item() - a_inv.item()) > 0.05


def test_neighbour_refresh_is_the_authors_update_nn():
    f, bank, index, graph = inputs()
    _, _, want = authors_forward(f, index, bank, graph, TAU, K_BG, STEPS, K_NN, P)
    for chunk in (65536, 100):  # one pass, and a chunked scan merged
        got = refresh_neighbours(f, bank, index, K_NN, chunk=chunk)
        assert torch.equal(got.sort(1).values, want.sort(1).values)
    # a query equal to its own entry: self is the top match and is replaced by the (k+1)-th
    own = refresh_neighbours(bank[index], bank, index, K_NN)
    assert not (own == index[:, None]).any()
    top = (bank[index] @ bank.t()).topk(K_NN + 1, dim=1).indices
    assert torch.equal(own, authors_update_nn(top, index, K_NN))


def _method(tiny_cfg, *over):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(*over, config=f"{ROOT}/{CFG}")
    return get_method("invp")(cfg, build_backbone(cfg.model, 32), 32, 512)


def test_step_refresh_in_the_method_replaces_the_batch_rows_from_the_pre_update_bank(tiny_cfg):
    m = _method(tiny_cfg, "method.graph_refresh=step", "method.positives=authors")
    m.begin_epoch(0, fresh=True)
    assert (m.graph >= 0).all()
    g0, bank0 = m.graph.clone(), m.bank.clone()
    idx = torch.tensor([5, 9, 100, 311])
    m([torch.randn(4, 3, 32, 32)], idx)
    f = m._pending[0].clone()
    m.after_step()
    sims = (f @ bank0.t()).topk(m.cfg.method.graph_k + 1, dim=1).indices
    assert torch.equal(m.graph[idx], authors_update_nn(sims, idx, m.cfg.method.graph_k))
    rest = torch.ones(512, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(m.graph[rest], g0[rest])
    m.begin_epoch(1, fresh=True)  # not rebuilt at the next epoch
    assert torch.equal(m.graph[idx], authors_update_nn(sims, idx, m.cfg.method.graph_k))
    assert _method(tiny_cfg).cfg.method.graph_refresh == "step"  # the default (the paper does not say)
    e = _method(tiny_cfg, "method.graph_refresh=epoch")  # rebuilt from the bank every epoch
    e.begin_epoch(0, fresh=True)
    e.graph[:3] = 0
    e.begin_epoch(1, fresh=True)
    assert torch.equal(e.graph, knn_graph(e.bank, e.cfg.method.graph_k))


def test_weight_decay_scope(tiny_cfg):
    groups = _method(tiny_cfg, "method.weight_decay_scope=weights").param_groups(0.1, 5e-4)  # the base's two groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] and all(p.ndim > 1 for p in groups[0]["params"])
    m = _method(tiny_cfg)  # the default (the paper does not say): the authors' all
    (g,) = m.param_groups(0.1, 5e-4)  # main.py: SGD(network.parameters(), weight_decay=...)
    assert g["weight_decay"] == 5e-4 and len(g["params"]) == len([p for p in m.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.positives=multiset", "method.positives"),
        ("method.graph_refresh=batch", "method.graph_refresh"),
        ("method.hard_mode=easiest", "method.hard_mode"),
        ("method.weight_decay_scope=biases", "method.weight_decay_scope"),
    ],
)
def test_bad_switch_values_are_refused_naming_the_key(tiny_cfg, override, key):
    from fastssl.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(override, config=f"{ROOT}/{CFG}")
    assert str(e.value).startswith(key)


def test_authors_cifar_config_loads_with_their_recipe():
    from fastssl.config import load_config

    # (validated on the built-in set: CIFAR-10's files are not needed to check the method's keys)
    cfg = load_config(f"{ROOT}/configs/invp/cifar10-authors.yaml", ["data.source=builtin"])
    m = cfg.method
    assert (m.temperature, m.head, m.hard_positives, m.flip) == (0.2, "mlp", 20, False)
    assert (m.positives, m.graph_refresh, m.hard_mode, m.weight_decay_scope) == (
        "authors",
        "step",
        "least_similar",
        "all",
    )
    assert cfg.optim.schedule == "cosine" and m.blur == 0 and m.color.hue == 144.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        "method.positives=authors",
        "method.graph_refresh=step",
        "method.hard_mode=most_similar",
        "method.weight_decay_scope=all",
        "all",
    ],
)
def test_each_authors_mode_trains(tmp_path, mode):
    """A few steps per switch; ``all``: every authors' switch at once, across an epoch's end
    (8 steps an epoch), where graph_refresh=step keeps the graph instead of rebuilding it."""
    out = tmp_path / "run"
    modes = (
        [
            "method.positives=authors",
            "method.graph_refresh=step",
            "method.hard_mode=most_similar",
            "method.weight_decay_scope=all",
            "train.max_steps=10",
        ]
        if mode == "all"
        else [mode, "train.max_steps=6"]
    )
    run(train_cmd(out, *modes, "method.rampup_epoch=0", "data.batch_size=64", config=CFG))
    recs = step_records(out)
    assert recs and all(np.isfinite(r["loss"]) for r in recs) and np.isfinite(recs[-1]["loss_inv"])
