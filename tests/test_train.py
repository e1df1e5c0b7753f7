"""End-to-end runs of fastssl/train.py: files written, DDP, crash-resume, signals, learning."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import (
    ROOT,
    env,
    eval_trained_and_random,
    kill_and_resume,
    load_ckpt,
    read_metrics,
    run,
    step_records,
    train_cmd,
)

FIELDS = {"step", "epoch", "loss", "lr", "images_per_s", "data_stall"}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_gloo_ddp_writes_the_run_files(tmp_path):
    out = tmp_path / "ddp"
    p = run(train_cmd(out, "train.epochs=1", "train.ckpt_every_steps=3", nproc=2))
    assert "2 x cpu" in p.stdout + p.stderr
    assert (out / "config.yaml").is_file()
    ck = load_ckpt(out / "checkpoints" / "last.pt")
    assert ck["step"] == 512 // (32 * 2) and ck["epoch"] == 1 and ck["step_in_epoch"] == 0
    assert len(ck["rng"]) == 2  # both ranks' RNG states
    for k in ("model", "optimizer", "scheduler", "scaler", "config"):
        assert k in ck
    recs = step_records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["ranks_agree"] for r in read_metrics(out) if "ranks_agree" in r] == [1.0]
    assert "ranks_agree" not in p.stdout + p.stderr  # (recorded; the last line says it: "identical on all 2 ranks")
    assert "parameters identical on all 2 ranks: True" in p.stdout + p.stderr
    for r in recs:
        assert FIELDS <= set(r) and 0 <= r["data_stall"] <= 1 and r["images_per_s"] > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert not [f for f in os.listdir(out / "checkpoints") if f.startswith(".tmp")]


@pytest.mark.slow
def test_torch_pipeline_trains_too(tmp_path):
    out = tmp_path / "tv"
    run(train_cmd(out, "train.max_steps=3", "data.pipeline=torch"))
    assert load_ckpt(out / "checkpoints" / "last.pt")["step"] == 3


def _params(path):
    return load_ckpt(path)["model"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    common = ["train.epochs=2", "train.ckpt_every_steps=5", "data.builtin.num_train=640"]  # 20 steps/epoch
    # a random kill step, mid-epoch or across the epoch boundary
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, "configs/sc/builtin.yaml", (6, 39))
    killed_at = crashed["step"]
    assert killed_at == kill_at // 5 * 5  # the last periodic checkpoint before the crash
    a, b = ref["model"], resumed["model"]
    assert resumed["step"] == 40
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill at step {killed_at} + resume"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "term"
    cmd = train_cmd(out, "train.epochs=3", "train.ckpt_every_steps=1000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    t_sig = time.time()
    assert proc.wait(timeout=60) == 0
    assert time.time() - t_sig < 30
    ck = load_ckpt(out / "checkpoints" / "last.pt")
    assert ck["reason"] == "signal SIGTERM" and 3 <= ck["step"] < 48
    run(cmd + ["--resume"])
    assert load_ckpt(out / "checkpoints" / "last.pt")["step"] == 48


@pytest.mark.slow
@pytest.mark.ddp
def test_sigusr1_to_one_rank_stops_both(tmp_path):
    out = tmp_path / "usr1"
    cmd = train_cmd(out, "train.epochs=5", "train.ckpt_every_steps=1000", nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 2:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)  # rank 1 only: rank 0 must stop with it
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    ck = load_ckpt(out / "checkpoints" / "last.pt")
    assert ck["step"] < 5 * 8 and ck["reason"].startswith("signal")


@pytest.mark.slow
def test_resume_without_checkpoint_starts_fresh_and_bad_checkpoint_is_reported(tmp_path):
    out = tmp_path / "fresh"
    p = run(train_cmd(out, "train.max_steps=2") + ["--resume"])
    assert "no checkpoint" in p.stderr
    with open(out / "checkpoints" / "last.pt", "wb") as f:
        f.write(b"not a checkpoint")
    p = run(train_cmd(out, "train.max_steps=4") + ["--resume"], check=False)
    assert p.returncode != 0 and "corrupt" in p.stderr


@pytest.mark.slow
@pytest.mark.learning
def test_sc_beats_random_init_under_the_linear_probe(tmp_path):
    """A short SC run on the built-in set must beat the same network untrained by a clear margin."""
    out = tmp_path / "learn"
    run(train_cmd(out, "train.epochs=4", "data.builtin.num_train=2048", "data.batch_size=64", tiny=False))
    sc, random = eval_trained_and_random(
        out, "linear", "eval.linear_epochs=30", "eval.linear_seeds=1", "data.builtin.num_train=2048"
    )
    assert sc["accuracy"] >= random["accuracy"] + 5.0, (sc, random)


@pytest.mark.slow
def test_resume_with_changed_settings_says_which(tmp_path):
    """A run resumed with settings that differ from its checkpoint's (here a new max_steps and lr;
    in the field, a default changed by a newer fastssl) names each, old -> new, and continues."""
    out = tmp_path / "changed"
    run(train_cmd(out, "train.max_steps=2"))
    p = run(train_cmd(out, "train.max_steps=4", "optim.lr=0.123") + ["--resume"])
    (line,) = [x for x in p.stderr.splitlines() if "differ from the checkpoint's" in x]
    assert "optim.lr: " in line and "-> 0.123" in line and "train.max_steps: 2 -> 4" in line, line
    assert load_ckpt(out / "checkpoints" / "last.pt")["step"] == 4
    p = run(train_cmd(out, "train.max_steps=4", "optim.lr=0.123") + ["--resume"])  # the same settings: silent
    assert "differ from the checkpoint's" not in p.stderr


def test_config_changes_lists_each_changed_key():
    from omegaconf import OmegaConf

    from fastssl.config import load_config
    from fastssl.engine.checkpoint import config_changes

    a = load_config(f"{ROOT}/configs/invp/builtin.yaml", [])
    assert config_changes(a, a) == []
    b = load_config(f"{ROOT}/configs/invp/builtin.yaml", ["method.graph_refresh=epoch", "seed=7"])
    assert config_changes(a, b) == ["method.graph_refresh: 'step' -> 'epoch'", f"seed: {a.seed!r} -> 7"]
    old = OmegaConf.to_container(a)  # a checkpoint written before a key existed
    del old["method"]["weight_decay_scope"]
    assert config_changes(old, a) == ["method.weight_decay_scope: '<absent>' -> 'all'"]
    many = [f"method.{k}={v}" for k, v in (("graph_k", 5), ("graph_steps", 2), ("lam", 0.5), ("temperature", 0.3))]
    c = load_config(f"{ROOT}/configs/invp/builtin.yaml", [*many, "seed=7", "optim.lr=0.5", "optim.momentum=0.5"])
    assert config_changes(a, c, limit=3)[-1] == "... and 4 more"
