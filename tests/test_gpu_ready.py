"""GPU readiness, checked on a CPU: every kernel configuration compiled for sm_90 and sm_80,
64-bit offsets, the eager twins' precision under autocast, the fused kernels' one-time check
and the fallback to eager, deterministic cuBLAS, the CUDA device index, and DDP leaving the
method state it keeps consistent itself alone."""

import json
import os

import pytest
import torch

from conftest import PY, ROOT, TINY, read_metrics, run, train_cmd
from fastssl.kernels.compiled import problems

# ---------------------------------------------------------------- compiled for a GPU target


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "rows.json"
    p = run(
        [PY, "-m", "fastssl.kernels.compiled", "--arch", "90", "80", "--json", str(out), "--workers", "2"],
        check=False,
        env_extra={"TRITON_INTERPRET": "0"},
    )
    return p, json.loads(out.read_text())


@pytest.mark.slow
def test_every_kernel_configuration_compiles_for_sm90_and_sm80_and_fits(compiled):
    """Each launch the kernel files make (one per kernel variant and input precision), compiled as
    a real launch specialises it, at training's sizes (every size a multiple of 16) and at sizes
    divisible by nothing: it compiles, fits the target's shared memory (the SC backward needed
    786,432 B at D = 2,048 before the feature dimension was tiled), and uses the tensor cores for
    bf16, fp16 and TF32 inputs; on sm_90 (H100/H200) nothing spills (the exact fp32 SC backward
    launched at D = 128 spilled 16 B before its D chunk went from 32 to 16)."""
    p, rows = compiled
    assert p.returncode == 0, p.stderr[-2000:]
    kernels = {
        "sc_fwd",
        "sc_bwd_f1",
        "sc_bwd_f2",
        "triplet_hardest_euclidean",
        "triplet_hardest_cosine",
        "bank_scan_topk",
        "bank_scan_full",
        "bank_grad_full",
        "bank_grad_topk",
    }
    assert {r["kernel"] for r in rows} == kernels
    for arch in ("sm_90", "sm_80"):
        for prec in ("fp32", "tf32", "bf16", "fp16"):
            for variant in ("aligned", "odd"):
                have = {r["kernel"] for r in rows if (r["arch"], r["precision"], r["variant"]) == (arch, prec, variant)}
                # (the TF32 top-K gather has no product: it is the fp32 row)
                assert have == kernels - ({"bank_grad_topk"} if prec == "tf32" else set()), (arch, prec, variant)
    for r in rows:
        assert not problems(r), (r, problems(r))
        assert r["shared"] <= {"sm_90": 232448, "sm_80": 166912}[r["arch"]]
        if r["uses_dot"]:
            expected = "none" if r["precision"] == "fp32" else ("wgmma" if r["arch"] == "sm_90" else "mma")
            assert r["tensor_cores"] == expected, r
        if r["arch"] == "sm_90":
            assert r["stack"] == 0, f"{r['kernel']} {r['precision']} {r['variant']} spills on sm_90: {r}"
            assert r["registers"] <= 255


@pytest.mark.slow
def test_the_one_time_check_compiles_the_variants_training_launches():
    """The self-check's sizes keep training's sizes modulo 16, so each kernel it checks is the
    variant training launches (compared through Triton's own specialisation of the recorded
    launches); the old fixed 37 x 70 check compiled other variants."""
    p = run([PY, "-m", "fastssl.kernels.compiled", "--selfcheck"], check=False, env_extra={"TRITON_INTERPRET": "0"})
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and len(rows) == 2 * 2 * 9 and all(r["same"] for r in rows), p.stdout + p.stderr[-2000:]
    old = run(
        [
            PY,
            "-c",
            "import torch; from fastssl.kernels.compiled import variant_keys as v, VARIANTS as V\n"
            "t, c = v(torch.float32, dict(V['aligned'], K=4096)), v(torch.float32, dict(B=37, D=70, N=301, K=16))\n"
            "print(sorted(k for k in t if t[k] != c.get(k)))",
        ],
        env_extra={"TRITON_INTERPRET": "0"},
    )
    assert "sc_bwd_f1" in old.stdout and "bank_scan_topk" in old.stdout, old.stdout


def test_launch_configurations_do_not_depend_on_the_feature_dimension():
    """The launchers read their tiles from configs(dtype) alone, so the compiled table covers
    every D the model schema allows (a ResNet-50's 2,048 included)."""
    from fastssl.kernels import bank_loss, sc_loss, triplet

    for mod in (sc_loss, triplet, bank_loss):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cfg = mod.configs(dtype, interp=False)
            for c in cfg.values():
                assert max(v for k, v in c.items() if k.startswith("BLOCK_D")) <= 64


def test_offsets_past_2_to_the_31_elements():
    """dot_tile reaches a block whose first row lies past element 2^31 (a 1.28M-entry bank at
    D = 2,048): with 32-bit offsets the probe reads outside the tensor (segfault)."""
    p = run([PY, "tests/int64_probe.py"], check=False, env_extra={"TRITON_INTERPRET": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stdout, p.stderr[-500:])


# ---------------------------------------------------------------- eager twins under autocast


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(33, 40, generator=g) for _ in range(3)]


def test_eager_twins_compute_in_fp32_under_autocast():
    """Under bf16 autocast the eager twins still compute in fp32 (their matmuls used to run in
    bf16 there, while the kernels accumulate fp32): same result as without autocast."""
    from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager
    from fastssl.losses.sc_loss import sc_loss_eager
    from fastssl.losses.triplet import hardest_negatives_eager, triplet_loss_eager

    a, p, n = _inputs()
    bank = torch.nn.functional.normalize(torch.randn(300, 40, generator=torch.Generator().manual_seed(1)), dim=1)
    fa = torch.nn.functional.normalize(a, dim=1)
    index, pos = torch.arange(33), torch.randint(0, 300, (33, 4), generator=torch.Generator().manual_seed(2))
    calls = [
        lambda: sc_loss_eager(a, p),
        lambda: triplet_loss_eager(a, p, n, distance="cosine", hardest=True),
        lambda: hardest_negatives_eager(a, p, n, distance="cosine")[0],
        lambda: torch.stack(bank_loss_eager(fa, bank, index, pos, BankLossSettings(0.07, 16, 2))),
        lambda: torch.stack(bank_loss_eager(fa, bank, index, pos, BankLossSettings(0.07, 0, 0))),
    ]
    for call in calls:
        ref = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_loss_input_follows_autocast():
    from fastssl.losses.precision import loss_input

    x = torch.randn(4, 3, dtype=torch.float64)
    assert loss_input(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_input(x).dtype == torch.bfloat16


# ---------------------------------------------------------------- one-time check and fallback


def test_selfcheck_passes_interpreted_and_fault_injection_fails(monkeypatch):
    from fastssl.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    for name in selfcheck.KERNELS:
        ok, why = selfcheck.check(name, "cpu")
        assert ok, (name, why)
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setenv("FASTSSL_FAULT_KERNEL", "triplet")
    assert selfcheck.check("triplet", "cpu") == (False, "fault injected (FASTSSL_FAULT_KERNEL)")
    assert selfcheck.check("sc_loss", "cpu")[0]


def test_auto_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    from fastssl.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setattr(selfcheck, "_SAID", set())
    t = torch.zeros(2)
    monkeypatch.delenv("FASTSSL_AUTO_INTERPRETED", raising=False)
    assert selfcheck.resolve("auto", "sc_loss", t) == "eager"  # a CPU tensor: eager without a check
    monkeypatch.setenv("FASTSSL_AUTO_INTERPRETED", "1")
    assert selfcheck.resolve("auto", "sc_loss", t) == "fused"
    monkeypatch.setenv("FASTSSL_FAULT_KERNEL", "bank_loss")
    assert selfcheck.resolve("auto", "bank_loss", t) == "eager"
    assert selfcheck.resolve("auto", "bank_loss", t) == "eager"
    assert selfcheck.resolve("fused", "bank_loss", t) == "fused"  # asked for explicitly
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fastssl: loss: the fused bank_loss kernel is not used (fault injected (FASTSSL_FAULT_KERNEL)); "
        "training on its eager twin (set loss.impl=eager to skip the check)"
    ]


@pytest.mark.slow
def test_training_continues_on_eager_when_the_kernel_check_fails(tmp_path):
    """A forced kernel failure: loss.impl=auto trains on the eager twin, says so in one line,
    and its losses are the eager run's."""
    losses = {}
    for name, impl, extra in (("eager", "eager", {}), ("auto", "auto", {"FASTSSL_FAULT_KERNEL": "sc_loss"})):
        p = run(
            train_cmd(tmp_path / name, "train.max_steps=3", f"loss.impl={impl}", "data.batch_size=16"),
            env_extra={"TRITON_INTERPRET": "1", "FASTSSL_AUTO_INTERPRETED": "1", **extra},
        )
        recs = read_metrics(tmp_path / name)
        losses[name] = [r["loss"] for r in recs if "loss" in r]  # (not the monitor's step-0 record)
        if name == "auto":
            lines = [x for x in p.stderr.splitlines() if "fused sc_loss kernel is not used" in x]
            assert len(lines) == 1 and "fault injected" in lines[0], p.stderr[-2000:]
    assert len(losses["auto"]) == 3 and losses["auto"] == losses["eager"]


@pytest.mark.slow
def test_a_fused_backward_returning_half_the_gradient_is_caught_in_bf16(tmp_path, monkeypatch, capsys):
    """A planted bug: the fused SC backward returns half the gradient.  In bf16 (the GPU default;
    the interpreter runs bf16 too) SC's gradients are about 0.01, which the old check, an error
    divided by max(|reference|, 1) against 3e-2, let through; the check relative to each tensor
    sees it, and training falls back to the eager twin with its one line."""
    from fastssl import train
    from fastssl.kernels import sc_loss, selfcheck

    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setattr(selfcheck, "_SAID", set())
    monkeypatch.setenv("FASTSSL_AUTO_INTERPRETED", "1")
    backward = sc_loss.SCLossFused.backward

    def half(ctx, gout):
        g1, g2, none = backward(ctx, gout)
        return g1 / 2, g2 / 2, none

    monkeypatch.setattr(sc_loss.SCLossFused, "backward", staticmethod(half))
    args = ["--config", os.path.join(ROOT, "configs/sc/builtin.yaml"), f"out_dir={tmp_path}", *TINY]
    assert train.main([*args, "train.max_steps=2", "train.precision=bf16", "loss.impl=auto"]) == 0
    said = [x for x in capsys.readouterr().err.splitlines() if "fused sc_loss kernel is not used" in x]
    assert len(said) == 1 and "gradient differs from the eager twin by 5.00e-01 of its size" in said[0], said
    ok, _ = selfcheck.check("sc_loss", "cpu", torch.bfloat16, sizes=selfcheck.check_sizes(B=32, D=64))
    assert not ok
    # the old criterion on the same tensors would have passed it
    run_ = selfcheck._cases("sc_loss", selfcheck.check_sizes(B=32, D=64), False)
    fused, eager = (
        run_("fused", torch.device("cpu"), torch.bfloat16),
        run_("eager", torch.device("cpu"), torch.bfloat16),
    )
    old = max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for a, b in zip(fused, eager))
    assert old <= 3e-2


def test_the_check_follows_loss_tf32(monkeypatch):
    from fastssl.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setenv("FASTSSL_AUTO_INTERPRETED", "1")
    assert selfcheck.resolve("auto", "triplet", torch.zeros(2), True, B=256, D=128) == "fused"
    assert [k[3] for k in selfcheck._RESULTS] == [True]  # (name, device, dtype, tf32, sizes)


# ---------------------------------------------------------------- engine: devices, determinism, DDP


def test_deterministic_mode_sets_the_cublas_workspace():
    p = run(
        [
            PY,
            "-c",
            "import os; from fastssl import dist; dist.deterministic(); "
            "import torch; print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.are_deterministic_algorithms_enabled())",
        ]
    )
    assert p.stdout.split() == [":4096:8", "True"]


def test_device_id_is_torchs_device_not_the_local_rank():
    """With one visible GPU per rank (SLURM), local rank 3 uses cuda:0: DALI and FAISS get 0."""
    from fastssl.dist import DistInfo

    assert DistInfo(3, 4, 3, torch.device("cuda", 0)).device_id == 0
    assert DistInfo(0, 1, 0, torch.device("cpu")).device_id is None


def _ddp_worker(rank, world, store_path, q):
    import torch.distributed as tdist

    from fastssl.dist import wrap_ddp

    tdist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("bank", torch.full((4, 3), float(rank)))
            self.register_buffer("stat", torch.full((2,), float(rank)))

        def forward(self, x):
            return self.lin(x)

    m = M()
    ddp = wrap_ddp(m, keep_local=("bank",))
    ddp(torch.ones(1, 3)).sum().backward()
    q.put((rank, m.bank[0, 0].item(), m.stat[0].item()))
    tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_does_not_rebroadcast_the_state_a_method_keeps_consistent(tmp_path):
    """InvP's bank and graph (~700 MB a step at ImageNet size) are not re-sent from rank 0 at
    every forward; other buffers (BatchNorm statistics) still are."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "store"), q)) for r in range(2)]
    for pr in procs:
        pr.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for pr in procs:
        pr.join(60)
    assert got == [(0, 0.0, 0.0), (1, 1.0, 0.0)]


def test_invp_keeps_its_bank_and_graph_local(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(config=os.path.join(ROOT, "configs/invp/builtin.yaml"))
    m = get_method("invp")(cfg, build_backbone(cfg.model, 32), 32, 512)
    assert set(m.ddp_keep_local) == {"bank", "graph"} <= set(dict(m.named_buffers()))
