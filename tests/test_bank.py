"""The memory bank (fastssl.models.bank), the projection heads (fastssl.models.heads) and the kNN
graph helpers (fastssl.knn.graph) against the expressions InvP used inline before they moved
there, and against direct computations."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from fastssl.knn.graph import knn_graph, propagate
from fastssl.models.bank import MemoryBank, all_gather_batch, initial_bank
from fastssl.models.heads import HEADS, LinearHead, MLPHead, projection_head


def old_init(n, dim, seed):
    """InvP's bank initialisation before MemoryBank."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


def old_update(bank, f, idx, mom):
    """InvP's after_step update before MemoryBank (one process), on a copy."""
    bank = bank.clone()
    bank[idx] = F.normalize(mom * bank[idx] + (1 - mom) * f, dim=1)
    return bank


# ----------------------------------------------------------------------------- memory bank


def test_initialisation_is_the_seeded_unit_rows_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    b = MemoryBank(50, 8, 0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(b.bank, old_init(50, 8, 7)) and torch.equal(initial_bank(50, 8, 7), b.bank)
    assert b.tensor is b.bank and len(b) == 50
    torch.testing.assert_close(b.bank.norm(dim=1), torch.ones(50))
    assert not torch.equal(MemoryBank(50, 8, 0.5, seed=8).bank, b.bank)


@pytest.mark.parametrize("mom", [0.0, 0.5, 0.9])
def test_update_is_the_renormalised_ema_of_the_visited_rows(mom):
    g = torch.Generator().manual_seed(1)
    b = MemoryBank(40, 6, mom, seed=3)
    before = b.tensor.clone()
    idx = torch.randperm(40, generator=g)[:9]
    f = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    b.update(f, idx)
    want = F.normalize(mom * before[idx] + (1 - mom) * f, dim=1)
    assert torch.equal(b.tensor[idx], want)
    assert torch.equal(b.tensor, old_update(before, f, idx, mom))
    torch.testing.assert_close(b.tensor.norm(dim=1), torch.ones(40))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(b.tensor[untouched], before[untouched])


def test_repeated_indices_behave_as_the_inline_index_assignment():
    g = torch.Generator().manual_seed(2)
    b = MemoryBank(10, 4, 0.5, seed=0)
    before = b.tensor.clone()
    idx = torch.tensor([3, 7, 3, 1, 3, 7])
    f = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    b.update(f, idx)
    assert torch.equal(b.tensor, old_update(before, f, idx, 0.5))
    # each repeated row holds one of its writes, each computed from the bank before the update
    for row in (3, 7):
        writes = F.normalize(0.5 * before[row] + 0.5 * f[idx == row], dim=1)
        assert any(torch.equal(b.tensor[row], w) for w in writes)


def test_stash_then_step_consumes_the_detached_batch():
    b = MemoryBank(12, 3, 0.5, seed=0)
    before = b.tensor.clone()
    f = F.normalize(torch.randn(2, 3, requires_grad=True), dim=1)
    idx = torch.tensor([4, 9])
    b.stash(f, idx)
    assert not b.pending[0].requires_grad and b.pending[1] is idx
    b.stash(f * 0 + 1, idx)  # a later stash replaces the earlier one (a skipped step's batch)
    b.step()
    assert b.pending is None
    assert torch.equal(b.tensor, old_update(before, (f * 0 + 1).detach(), idx, 0.5))
    with pytest.raises(RuntimeError, match="nothing stashed"):
        b.step()


def test_hosted_bank_keeps_the_hosts_key_and_follows_it():
    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.memory = MemoryBank(6, 3, 0.5, seed=1, host=self, name="bank")
            self.register_buffer("graph", torch.zeros(6, 2, dtype=torch.long))

    h = Host()
    assert list(h.state_dict())[:2] == ["bank", "graph"] and not any(k.startswith("memory") for k in h.state_dict())
    assert h.memory.tensor is h.bank and "bank" in dict(h.named_buffers())
    assert list(h.memory.state_dict()) == []
    h.double()  # a move replaces the host's buffer: the bank follows it
    assert h.memory.tensor is h.bank and h.bank.dtype == torch.float64
    new = torch.randn(6, 3, dtype=torch.float64)
    h.load_state_dict({**h.state_dict(), "bank": new})
    assert torch.equal(h.memory.tensor, new)


def test_agreement_and_gather_on_one_process():
    b = MemoryBank(5, 2, 0.5, seed=0)
    assert b.check_agreement(torch.zeros(5, 1, dtype=torch.long))
    f, i = torch.randn(3, 2), torch.arange(3)
    assert all_gather_batch(f, i) == (f, i)


def _gloo_worker(rank, world, store, q):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    b = MemoryBank(16, 4, 0.5, seed=0)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    b.stash(F.normalize(torch.randn(3, 4, generator=g), dim=1), torch.tensor([rank, 5 + rank, 10 + rank]))
    b.step()
    agree = b.check_agreement(torch.arange(16))
    if rank == 1:
        b.tensor[0, 0] += 1e-3
    disagree = b.check_agreement()
    q.put((rank, b.tensor.clone(), agree, disagree))
    tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_apply_every_ranks_batch_and_agree(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    fs, ids = [], []
    for r in range(2):
        g = torch.Generator().manual_seed(100 + r)
        fs.append(F.normalize(torch.randn(3, 4, generator=g), dim=1))
        ids.append(torch.tensor([r, 5 + r, 10 + r]))
    want = old_update(old_init(16, 4, 0), torch.cat(fs), torch.cat(ids), 0.5)
    assert torch.equal(got[0][0], want)
    assert got[0][1] and got[1][1]  # equal banks (and extra tensors) after the gathered update
    assert not got[0][2] and not got[1][2]  # one rank's change is seen by every rank


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("kind", HEADS)
def test_heads_build_the_inline_layers_bit_identically(kind):
    torch.manual_seed(11)
    if kind == "mlp":
        old = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 5))
    else:
        old = nn.Linear(16, 5)
    after_old = torch.rand(1)
    torch.manual_seed(11)
    new = projection_head(kind, 16, 5)
    assert torch.equal(torch.rand(1), after_old)  # the same RNG draws
    assert isinstance(new, MLPHead if kind == "mlp" else LinearHead) and isinstance(new, type(old))
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 16)
    assert torch.equal(old(x), new(x))
    if kind == "mlp":
        assert new[1].inplace


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="linear, mlp"):
        projection_head("conv", 4, 2)


# ----------------------------------------------------------------------------- graph


def test_knn_graph_has_k_distinct_other_rows_the_most_similar():
    g = torch.Generator().manual_seed(5)
    bank = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    got = knn_graph(bank, 5)
    assert got.shape == (64, 5) and got.dtype == torch.long
    assert not (got == torch.arange(64)[:, None]).any()
    assert all(len(set(r)) == 5 for r in got.tolist())
    sims = bank @ bank.t()
    sims.fill_diagonal_(-2)
    assert torch.equal(got, sims.topk(5, dim=1).indices)
    small = knn_graph(bank[:4], 10)  # k is capped at N - 1
    assert small.shape == (4, 3) and all(sorted(r + [i]) == [0, 1, 2, 3] for i, r in enumerate(small.tolist()))


def brute_reach(graph, a, steps):
    """Nodes at the end of some walk of 1..steps edges from a, a excluded."""
    out, frontier = set(), {a}
    for _ in range(steps):
        frontier = {v for u in frontier for v in graph[u]}
        out |= frontier
    return out - {a}


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_propagate_equals_the_set_of_nodes_within_steps_hops(steps):
    g = [[1, 2], [0, 3], [3, 3], [4, 0], [2, 1]]  # a cycle back to the anchor, a repeated neighbour
    out = propagate(torch.tensor(g), torch.tensor([0, 2, 4, 0]), steps)
    assert out.shape == (4, sum(2**s for s in range(1, steps + 1)))
    for row, a in zip(out.tolist(), (0, 2, 4, 0)):
        vals = [v for v in row if v >= 0]
        assert set(vals) == brute_reach(g, a, steps) and len(vals) == len(set(vals))
        assert row == sorted(row, reverse=True)  # valid first (descending), -1 padding last


# ----------------------------------------------------------------------------- InvP uses them


def test_invp_keeps_its_keys_and_reexports_the_graph_helpers(tiny_cfg):
    import fastssl.knn.graph as kg
    from fastssl.methods import get_method, invp
    from fastssl.models import build_backbone

    assert invp.knn_graph is kg.knn_graph and invp.propagate is kg.propagate
    cfg = tiny_cfg(config=os.path.join(ROOT, "configs/invp/builtin.yaml"))
    m = get_method("invp")(cfg, build_backbone(cfg.model, 32), 32, 100)
    keys = list(m.state_dict())
    assert keys[:2] == ["bank", "graph"] and not any(k.startswith("memory") for k in keys)
    assert m.memory.tensor is m.bank and torch.equal(m.bank, old_init(100, cfg.method.feat_dim, cfg.seed + 1))
    assert m.memory.momentum == cfg.method.bank_momentum
    assert set(m.ddp_keep_local) <= set(dict(m.named_buffers()))
