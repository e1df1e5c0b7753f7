"""The step's GPU settings that can be checked without a GPU: cuDNN's benchmark mode by device and
determinism, ``train.compile`` (the backbone's stages compiled in place, checkpoints unchanged),
and the fused optimiser's device-side skip of a non-finite step (what CUDA runs), on the CPU."""

import os

import pytest
import torch

from conftest import ROOT, TINY, load_ckpt
from fastssl import train
from fastssl.config import ConfigError, load_config
from fastssl.engine import sync

SC = os.path.join(ROOT, "configs/sc/builtin.yaml")


@pytest.mark.parametrize(
    "choice, deterministic, device, on",
    [
        ("auto", False, "cuda", True),
        ("auto", True, "cuda", False),
        ("auto", False, "cpu", False),
        ("false", False, "cuda", False),
        ("true", False, "cpu", True),
    ],
)
def test_cudnn_benchmark_by_device_and_determinism(choice, deterministic, device, on):
    cfg = load_config(SC, [*TINY, f"train.cudnn_benchmark={choice}", f"train.deterministic={deterministic}"])
    assert train.cudnn_benchmark(cfg, torch.device(device)) is on


def test_cudnn_benchmark_true_is_refused_in_deterministic_mode():
    with pytest.raises(ConfigError, match=r"^train.cudnn_benchmark: true picks convolution kernels by timing"):
        load_config(SC, [*TINY, "train.cudnn_benchmark=true", "train.deterministic=true"])
    with pytest.raises(ConfigError, match=r"^train.cudnn_benchmark: 'sometimes' is not one of auto, true, false"):
        load_config(SC, [*TINY, "train.cudnn_benchmark=sometimes"])


@pytest.mark.slow
def test_compile_compiles_the_backbone_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import torch._dynamo

    compiled, real = [], train.compile_stages
    monkeypatch.setattr(train, "compile_stages", lambda b: compiled.append(real(b)))
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / name
        args = ["--config", SC, f"out_dir={out}", *TINY, "train.max_steps=3", f"train.compile={flag}"]
        assert train.main(args) == 0
        runs[name] = (load_ckpt(out / "checkpoints" / "last.pt"), dict(torch._dynamo.utils.counters["stats"]))
    assert compiled == [3]  # the convnet's three blocks (its stem is an Identity)
    (eager, eager_stats), (comp, comp_stats) = runs["eager"], runs["compiled"]
    assert comp_stats.get("unique_graphs", 0) >= 1 and not eager_stats.get("unique_graphs", 0)
    assert list(comp["model"]) == list(eager["model"])  # (no "_orig_mod." keys)
    for k, v in eager["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(comp["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)


def _sgd(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(67, 5))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, **({"fused": True} if fused else {}))
    sync.zero_momentum(opt)
    return p, opt


def test_fused_optimiser_skips_a_non_finite_first_step_on_the_device():
    """A first step skipped through found_inf leaves parameters and momentum as they were (torch
    alone would leave an uninitialised momentum buffer); the next step equals a first step."""
    p, opt = _sgd(fused=True)
    before = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    skip = sync.skip_flag([p])
    assert skip.dim() == 0 and bool(skip)
    sync.optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), skip)
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
    g = torch.randn(67, 5, generator=torch.Generator().manual_seed(1))
    p.grad = g.clone()
    sync.optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), sync.skip_flag([p]))
    q, ref = _sgd(fused=True)
    q.grad = g.clone()
    ref.step()
    assert torch.equal(p.detach(), q.detach())


def test_skip_flag_reuses_the_clipped_norm_and_sees_inf():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert bool(sync.skip_flag([p])) and not bool(sync.skip_flag([p], torch.tensor(2.0)))


@pytest.mark.slow
def test_nan_step_skipped_on_the_device_with_the_fused_optimiser(tmp_path, monkeypatch):
    """FASTSSL_NAN_AT_STEPS with optim.impl=fused (the CUDA path): the skipped step changes no
    parameter, and the step count and the log say so a step late or at the logging step."""
    monkeypatch.setenv("FASTSSL_NAN_AT_STEPS", "1,3")
    out = tmp_path / "nan"
    args = ["--config", SC, f"out_dir={out}", *TINY, "train.max_steps=4", "optim.impl=fused", "train.log_every_steps=2"]
    assert train.main(args) == 0
    ck = load_ckpt(out / "checkpoints" / "last.pt")
    assert ck["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(t).all() for s in ck["optimizer"]["state"].values() for t in s.values())
