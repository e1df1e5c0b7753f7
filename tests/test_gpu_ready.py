"""GPU readiness, checked on a CPU: every kernel configuration compiled for sm_90 and sm_80,
64-bit offsets, the eager twins' precision under autocast, the fused kernels' one-time check
and the fallback to eager, deterministic cuBLAS, the CUDA device index, and DDP leaving the
method state it keeps consistent itself alone."""

import json
import os

import pytest
import torch

from conftest import PY, ROOT, run, train_cmd

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


def test_every_kernel_configuration_compiles_for_sm90_and_sm80_and_fits(compiled):
    """Each launch the kernel files can make (one per kernel variant and input precision, for any
    B, N and D) compiles, fits the target's shared memory (the SC backward needed 786,432 B at
    D = 2,048 before the feature dimension was tiled), and uses the tensor cores for bf16, fp16
    and TF32 inputs; on sm_90 (H100/H200) nothing spills."""
    from fastssl.kernels.compiled import launches, problems

    p, rows = compiled
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(rows) == 2 * len(launches())
    assert {r["kernel"] for r in rows} >= {
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
    for r in rows:
        assert not problems(r), (r, problems(r))
        assert r["shared"] <= {"sm_90": 232448, "sm_80": 166912}[r["arch"]]
        if r["uses_dot"]:
            expected = "none" if r["precision"] == "fp32" else ("wgmma" if r["arch"] == "sm_90" else "mma")
            assert r["tensor_cores"] == expected, r
        if r["arch"] == "sm_90":
            assert r["stack"] == 0, f"{r['kernel']} {r['precision']} spills on sm_90: {r}"
            assert r["registers"] <= 255


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
    from fastssl.kernels.bank_loss import bank_loss_eager
    from fastssl.kernels.sc_loss import sc_loss_eager
    from fastssl.kernels.triplet import hardest_negatives_eager, triplet_loss_eager

    a, p, n = _inputs()
    bank = torch.nn.functional.normalize(torch.randn(300, 40, generator=torch.Generator().manual_seed(1)), dim=1)
    fa = torch.nn.functional.normalize(a, dim=1)
    index, pos = torch.arange(33), torch.randint(0, 300, (33, 4), generator=torch.Generator().manual_seed(2))
    calls = [
        lambda: sc_loss_eager(a, p),
        lambda: triplet_loss_eager(a, p, n, distance="cosine", hardest=True),
        lambda: hardest_negatives_eager(a, p, n, distance="cosine")[0],
        lambda: torch.stack(bank_loss_eager(fa, bank, index, pos, 0.07, 16, 2)),
        lambda: torch.stack(bank_loss_eager(fa, bank, index, pos, 0.07, 0, 0)),
    ]
    for call in calls:
        ref = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_loss_input_follows_autocast():
    from fastssl.kernels._common import loss_input

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


def test_training_continues_on_eager_when_the_kernel_check_fails(tmp_path):
    """A forced kernel failure: loss.impl=auto trains on the eager twin, says so in one line,
    and its losses are the eager run's."""
    losses = {}
    for name, impl, extra in (("eager", "eager", {}), ("auto", "auto", {"FASTSSL_FAULT_KERNEL": "sc_loss"})):
        p = run(
            train_cmd(tmp_path / name, "train.max_steps=3", f"loss.impl={impl}", "data.batch_size=16"),
            env_extra={"TRITON_INTERPRET": "1", "FASTSSL_AUTO_INTERPRETED": "1", **extra},
        )
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        if name == "auto":
            lines = [x for x in p.stderr.splitlines() if "fused sc_loss kernel is not used" in x]
            assert len(lines) == 1 and "fault injected" in lines[0], p.stderr[-2000:]
    assert len(losses["auto"]) == 3 and losses["auto"] == losses["eager"]


# ---------------------------------------------------------------- engine: devices, determinism, DDP


def test_deterministic_mode_sets_the_cublas_workspace():
    p = run(
        [
            PY,
            "-c",
            "import os; from fastssl.engine import dist; dist.deterministic(); "
            "import torch; print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.are_deterministic_algorithms_enabled())",
        ]
    )
    assert p.stdout.split() == [":4096:8", "True"]


def test_device_id_is_torchs_device_not_the_local_rank():
    """With one visible GPU per rank (SLURM), local rank 3 uses cuda:0: DALI and FAISS get 0."""
    from fastssl.engine.dist import DistInfo

    assert DistInfo(3, 4, 3, torch.device("cuda", 0)).device_id == 0
    assert DistInfo(0, 1, 0, torch.device("cpu")).device_id is None


def _ddp_worker(rank, world, store_path, q):
    import torch.distributed as tdist

    from fastssl.engine.dist import wrap_ddp

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
