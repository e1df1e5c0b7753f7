"""Each fused kernel against its eager twin: values, gradients and indices, odd sizes, dtypes.
On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py)."""

import pytest
import torch

from conftest import PY, read_metrics, run, train_cmd
from fastssl.kernels.bank_loss import bank_loss_fused, bank_lse, last_fallback_rows
from fastssl.kernels.sc_loss import sc_loss_fused
from fastssl.kernels.triplet import hardest_negatives_fused, triplet_loss_fused
from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager
from fastssl.losses.sc_loss import sc_loss_eager
from fastssl.losses.triplet import hardest_negatives_eager, pair_distance, triplet_loss_eager

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [(1, 1), (5, 3), (37, 70), (64, 128), (65, 33), (100, 257)]


def leaf(x, dtype):
    return x.to(DEV, dtype).requires_grad_()


def grads(fn, *xs):
    loss = fn(*xs)
    g = torch.autograd.grad(loss, xs)
    return loss.detach().float(), [t.float() for t in g]


@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sc_fused_equals_eager(B, D, dtype):
    g = torch.Generator().manual_seed(B * 1000 + D)
    f1 = leaf(torch.randn(B, D, generator=g), dtype)
    f2 = leaf(torch.randn(B, D, generator=g) * 0.5 + f1.detach().float().cpu() * 0.5, dtype)
    lf, gf = grads(sc_loss_fused, f1, f2)
    le, ge = grads(sc_loss_eager, f1, f2)
    tol = TOL[dtype]
    torch.testing.assert_close(lf, le, atol=tol * max(1.0, le.abs().item()), rtol=tol)
    for a, b in zip(gf, ge):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol * 10)


def test_sc_fused_zero_distance_and_scaled_gradient():
    f = leaf(torch.randn(9, 6), torch.float32)
    same = f.detach().clone().requires_grad_()
    loss = sc_loss_fused(f, same) * 3.0  # upstream gradient 3
    loss.backward()
    ref_a, ref_b = f.detach().clone().requires_grad_(), same.detach().clone().requires_grad_()
    (sc_loss_eager(ref_a, ref_b) * 3.0).backward()
    assert torch.isfinite(f.grad).all()
    torch.testing.assert_close(f.grad, ref_a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(same.grad, ref_b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B,D", SHAPES[1:])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hardest_negative_indices_agree(B, D, distance, with_neg, dtype):
    g = torch.Generator().manual_seed(B + D)
    a = torch.randn(B, D, generator=g).to(DEV, dtype)
    p = (a.float() + 0.3 * torch.randn(B, D, generator=g).to(DEV)).to(dtype)
    n = torch.randn(B, D, generator=g).to(DEV, dtype) if with_neg else None
    de, ie = hardest_negatives_eager(a, p, n, distance)
    df, i_f = hardest_negatives_fused(a, p, n, distance)
    if dtype == torch.float32:
        assert torch.equal(ie, i_f)
    else:  # near-ties may flip under half-precision rounding: the picked one must be as close
        assert (ie == i_f).float().mean() > 0.9
        cands = p if n is None else torch.cat([p, n])
        picked = pair_distance(a, cands[i_f], distance)
        assert (i_f != torch.arange(B, device=DEV)).all()  # never the anchor's own positive
        torch.testing.assert_close(picked, de, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(df, de, atol=TOL[dtype] * 10 if dtype != torch.float32 else 1e-5, rtol=TOL[dtype])


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("B,D", [(7, 5), (50, 64), (33, 129)])
def test_triplet_fused_equals_eager(distance, hardest, B, D):
    g = torch.Generator().manual_seed(B * D)
    xs = [leaf(torch.randn(B, D, generator=g), torch.float32) for _ in range(3)]
    kw = dict(margin=0.7, distance=distance, hardest=hardest)
    lf, gf = grads(lambda a, p, n: triplet_loss_fused(a, p, n, **kw), *xs)
    le, ge = grads(lambda a, p, n: triplet_loss_eager(a, p, n, **kw), *xs)
    torch.testing.assert_close(lf, le, atol=1e-5, rtol=1e-5)
    for a, b in zip(gf, ge):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_triplet_direct_computation_and_errors():
    a, p, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert triplet_loss_eager(a, p, n, margin=0.5).item() == pytest.approx(5.0 - 1.0 + 0.5)
    assert triplet_loss_eager(a, n, p, margin=0.5).item() == 0.0
    with pytest.raises(ValueError, match="distance"):
        triplet_loss_eager(a, p, n, distance="manhattan")
    with pytest.raises(ValueError, match="negatives are required"):
        triplet_loss_fused(a, p)


def unit(n, d, g, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype)


def assert_topk_sets_agree(idx, logits, k):
    """The fused top-K indices are the eager ones, up to exact ties at the K-th value."""
    kth = logits.topk(k, dim=1).values[:, -1:]
    chosen = logits.gather(1, idx)
    assert (chosen >= kth - 1e-4).all()  # everything picked is in the top-K
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # no entry twice


BANK = [
    (1, 17, 3, 5, None),
    (7, 300, 20, 50, None),
    (37, 2001, 33, 100, None),
    (37, 2001, 33, 100, 7),
    (16, 500, 130, 499, None),
    (5, 200, 16, 0, None),
    (9, 301, 64, 301, None),
    (3, 40, 600, 0, None),
    (3, 40, 600, 10, None),
]  # D > 512: the backward's D is split in chunks


@pytest.mark.parametrize(
    "B,N,D,K,stride,dtype",
    [(*s, torch.float32) for s in BANK]
    + [(*s, dt) for s in (BANK[3], BANK[5]) for dt in (torch.bfloat16, torch.float16)],
)
def test_bank_lse_fused_equals_eager(B, N, D, K, stride, dtype):
    """Top-K (or whole-bank) log-sum-exp of f @ bank.T / tau: value, indices and gradient."""
    g = torch.Generator().manual_seed(B * N + D)
    f, bank = leaf(unit(B, D, g), dtype), unit(N, D, g, dtype)
    lse, idx = bank_lse(f, bank, 0.07, K, sample_stride=stride)
    (gf,) = torch.autograd.grad((lse * torch.linspace(0.5, 1.5, B, device=DEV)).sum(), f)
    logits = f.float() @ bank.float().t() / 0.07
    if 0 < K < N:
        assert idx.shape == (B, K)
        assert_topk_sets_agree(idx, logits.detach(), K)
        ref = logits.topk(K, dim=1).values.logsumexp(1)
    else:
        assert idx is None
        ref = logits.logsumexp(1)
    (ge,) = torch.autograd.grad((ref * torch.linspace(0.5, 1.5, B, device=DEV)).sum(), f)
    tol = TOL[dtype]
    torch.testing.assert_close(lse, ref.detach(), atol=tol * 10, rtol=tol)
    torch.testing.assert_close(gf.float(), ge.float(), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("K,P", [(64, 3), (0, 0), (200, 0)])
def test_bank_loss_fused_equals_eager(K, P):
    """InvP's two terms (instance, propagated positives) and their gradients, fused vs eager."""
    g = torch.Generator().manual_seed(K + P)
    B, N, D = 23, 700, 40
    f, bank = leaf(unit(B, D, g), torch.float32), unit(N, D, g)
    index = torch.randperm(N, generator=g)[:B].to(DEV)
    pos = torch.randint(0, N, (B, 9), generator=g).to(DEV)
    pos[torch.rand(B, 9, generator=g).to(DEV) < 0.3] = -1
    pos[0] = -1  # a row without positives
    out = {}
    for name, fn in (("fused", bank_loss_fused), ("eager", bank_loss_eager)):
        l_ins, l_inv = fn(f, bank, index, pos, BankLossSettings(temperature=0.1, background=K, hard_positives=P))
        has = ~torch.isnan(l_inv)
        total = l_ins.mean() + 0.6 * l_inv[has].mean()
        out[name] = (l_ins.detach(), l_inv.detach(), torch.autograd.grad(total, f)[0])
    assert torch.isnan(out["fused"][1][0]) and torch.isnan(out["eager"][1][0])
    for a, b in zip(out["fused"], out["eager"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_bank_topk_exact_when_the_threshold_sample_fails():
    """A collapsed bank (every entry alike, the InvP failure mode) overflows the candidate
    lists, and a misleading sample leaves too few: the affected rows are recomputed exactly."""
    g = torch.Generator().manual_seed(3)
    f = unit(6, 8, g)
    same = unit(1, 8, g).expand(1000, 8).contiguous()
    lse, idx = bank_lse(f, same, 0.1, 50)
    assert last_fallback_rows() == 6
    torch.testing.assert_close(lse, (f @ same.t() / 0.1).topk(50, dim=1).values.logsumexp(1))
    bank = unit(400, 8, g)
    bank[::50] = f[0]  # the sampled entries are row 0's most similar: its threshold is too high
    lse, idx = bank_lse(f, bank, 0.1, 30, sample_stride=50)
    assert last_fallback_rows() >= 1
    assert idx.shape == (6, 30)
    assert_topk_sets_agree(idx, f @ bank.t() / 0.1, 30)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/sc/builtin.yaml", "configs/invp/builtin.yaml"])
def test_training_loss_fused_matches_eager(tmp_path, config):
    """loss.impl=fused (Triton; interpreted on CPU) gives the eager run's losses, step by step."""
    losses = {}
    for impl in ("eager", "fused"):
        out = tmp_path / impl
        run(train_cmd(out, "train.max_steps=4", f"loss.impl={impl}", "data.batch_size=16", config=config))
        recs = read_metrics(out)
        losses[impl] = [r["loss"] for r in recs if "loss" in r]  # (not the monitor's step-0 record)
    assert len(losses["fused"]) == 4
    for a, b in zip(losses["fused"], losses["eager"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_fused_refused_without_gpu_or_interpreter():

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run(
        [PY, "fastssl/train.py", "--config", "configs/sc/builtin.yaml", "loss.impl=fused"],
        check=False,
        env_extra={"TRITON_INTERPRET": "0"},
    )
    assert p.returncode == 2 and "loss.impl: fused kernels need a CUDA GPU" in p.stderr
