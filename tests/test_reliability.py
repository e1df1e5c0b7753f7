"""Faults and bad input: crash resume, pre-emption of evaluation, bad data files, non-finite
losses, failing checkpoint writes, and property-based config fuzzing.

Crash-resume of the other methods lives beside them: SC in test_train.py, layer-wise (across a
stage boundary) in test_layerwise.py, InvP (bank and graph) in test_invp.py; Split-Brain here.
"""

import json
import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PY, ROOT, TINY, env, kill_and_resume, load_ckpt, read_metrics, run, step_records, train_cmd
from fastssl.config import ConfigError, load_config

# --------------------------------------------------------------------------- crash resume


@pytest.mark.slow
def test_splitbrain_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    common = ["train.epochs=2", "train.ckpt_every_steps=4", "data.builtin.num_train=384"]  # 12 steps/epoch
    a, _, b, kill_at = kill_and_resume(tmp_path, common, "configs/splitbrain/builtin.yaml", (5, 23))
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after a kill at step {kill_at}"


# --------------------------------------------------------------------------- non-finite losses


@pytest.mark.slow
def test_nan_loss_is_skipped_and_counted(tmp_path):
    out = tmp_path / "nan"
    run(train_cmd(out, "train.max_steps=8", "train.ckpt_every_steps=100"), env_extra={"FASTSSL_NAN_AT_STEPS": "3,5"})
    recs = step_records(out)
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert np.isnan(recs[2]["loss"]) and all(np.isfinite(r["loss"]) for i, r in enumerate(recs) if i not in (2, 4))
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["step"] == 8 and ck["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan3"
    p = run(
        train_cmd(out, "train.max_steps=12", "train.ckpt_every_steps=2", "train.max_bad_steps=3"),
        check=False,
        env_extra={"FASTSSL_NAN_AT_STEPS": "5,6,7"},
    )
    assert p.returncode == 3
    assert "3 non-finite losses in a row" in p.stdout + p.stderr
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["step"] == 6  # the periodic checkpoint at step 6: its parameters are those of step 4
    ref = tmp_path / "ref"
    run(train_cmd(ref, "train.max_steps=4", "train.ckpt_every_steps=2"))
    good = load_ckpt(ref / "checkpoints/last.pt")["model"]
    for k, v in good.items():
        if "running" not in k and "num_batches" not in k:  # BN statistics saw the skipped batches
            assert torch.equal(v, ck["model"][k]), k


@pytest.mark.slow
@pytest.mark.ddp
def test_nan_skip_under_two_process_ddp(tmp_path):
    out = tmp_path / "ddpnan"
    run(train_cmd(out, "train.max_steps=5", nproc=2), env_extra={"FASTSSL_NAN_AT_STEPS": "2"})
    recs = step_records(out)
    assert recs[-1]["skipped_steps"] == 1 and [r["ranks_agree"] for r in read_metrics(out) if "ranks_agree" in r] == [
        1.0
    ]


# --------------------------------------------------------------------------- storage faults


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "disk"
    p = run(
        train_cmd(out, "train.max_steps=10", "train.ckpt_every_steps=3"),
        check=False,
        env_extra={"FASTSSL_FAIL_CKPT_AT_STEP": "6"},
    )
    assert p.returncode == 3
    assert "No space left on device" in p.stdout + p.stderr and "is intact" in p.stdout + p.stderr
    assert load_ckpt(out / "checkpoints/last.pt")["step"] == 3
    assert not [f for f in os.listdir(out / "checkpoints") if f.startswith(".tmp")]
    run(train_cmd(out, "train.max_steps=10", "train.ckpt_every_steps=3") + ["--resume"])
    assert load_ckpt(out / "checkpoints/last.pt")["step"] == 10


def test_save_atomic_failure_midway_in_process(tmp_path):
    from fastssl.engine import checkpoint as ckpt

    path = str(tmp_path / "last.pt")
    good = {"model": {"w": torch.arange(10000.0)}, "config": {}, "epoch": 1, "step": 5, "step_in_epoch": 0}
    ckpt.save_atomic(good, path)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic({**good, "step": 6, "model": {"w": torch.zeros(100000)}}, path, fail_after_bytes=1000)
    assert ckpt.load(path)["step"] == 5 and os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.slow
def test_truncated_checkpoint_is_reported_on_resume(tmp_path):
    out = tmp_path / "trunc"
    run(train_cmd(out, "train.max_steps=2"))
    f = out / "checkpoints/last.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = run(train_cmd(out, "train.max_steps=4") + ["--resume"], check=False)
    assert p.returncode == 2 and "corrupt" in p.stderr and str(f) in p.stderr


# --------------------------------------------------------------------------- pre-emption of evaluation


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_evaluation_preempted_then_resumed(tmp_path, sig):
    cfg = os.path.join(ROOT, "configs/sc/builtin.yaml")
    res = tmp_path / "lin.json"
    cmd = [
        PY,
        "-m",
        "fastssl.eval",
        "--config",
        cfg,
        "--random-init",
        "--protocol",
        "linear",
        "--out",
        str(res),
        *TINY,
        "eval.linear_epochs=400",
        "eval.linear_seeds=3",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = tmp_path / "lin.json.partial.json"
    t0 = time.time()
    while not partial.is_file():  # the first seed has finished
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(sig)
    t_sig = time.time()
    assert proc.wait(timeout=60) == 0
    assert time.time() - t_sig < 30
    assert "continue with --resume" in proc.stdout.read()
    done = json.loads(partial.read_text())["runs"]
    assert 1 <= len(done) < 3 and not res.exists()
    p = run(cmd + ["--resume"])
    assert "already done" in p.stdout
    out = json.loads(res.read_text())
    assert len(out["runs"]) == 3 and out["runs"][0] == done["0"] and not partial.exists()


# --------------------------------------------------------------------------- bad data


def _write_images(root, n, size=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, f"img{i}.jpg"))


def _bad_folder(tmp_path):
    """A class-folder dataset with every kind of bad and odd file among good JPEGs."""
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        _write_images(root / "train" / c, 24, seed=ord(c))
    _write_images(root / "val" / "a", 4, seed=5)
    _write_images(root / "val" / "b", 4, seed=6)
    good = (root / "train/a/img0.jpg").read_bytes()
    (root / "train/a/truncated.jpg").write_bytes(good[: len(good) // 2])
    png = root / "train/b/full.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(png)
    (root / "train/b/cut.png").write_bytes(png.read_bytes()[:60])
    (root / "train/b/notes.jpg").write_text("this is not an image")
    (root / "train/b/empty.png").write_bytes(b"")
    (root / "train/a/readme.txt").write_text("a non-image file")
    Image.new("L", (40, 40), 128).save(root / "train/a/gray.jpg")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(root / "train/b/cmyk.jpg")
    return root


def test_data_check_names_each_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))
    root = _bad_folder(tmp_path)
    p = run(
        [PY, "-m", "fastssl.data.check", str(root)], check=False, env_extra={"FASTSSL_CACHE": str(tmp_path / "cache")}
    )
    assert p.returncode == 1
    bad = {
        ln.strip()[len("bad: ") :].split(": ", 1)[0]: ln
        for ln in p.stdout.splitlines()
        if ln.strip().startswith("bad:")
    }
    assert set(bad) == {
        str(root / f) for f in ("train/a/truncated.jpg", "train/b/cut.png", "train/b/notes.jpg", "train/b/empty.png")
    }
    assert "truncated" in bad[str(root / "train/a/truncated.jpg")]
    assert "not an image" in bad[str(root / "train/b/notes.jpg")] and "empty" in bad[str(root / "train/b/empty.png")]
    assert "1 other files ignored" in p.stdout
    assert "grayscale -> RGB" in p.stdout and "CMYK -> RGB" in p.stdout
    assert "59 usable images (2 converted to RGB), 4 bad" in p.stdout


@pytest.mark.slow
def test_training_skips_bad_files_and_runs_whole_epochs(tmp_path):
    root = _bad_folder(tmp_path)
    out = tmp_path / "run"
    p = run(
        [
            PY,
            "fastssl/train.py",
            "--config",
            "configs/sc/builtin.yaml",
            f"out_dir={out}",
            "data.source=folder",
            f"data.path={root}",
            "data.image_size=32",
            "data.batch_size=16",
            "train.epochs=2",
            "model.width=8",
            "train.progress=false",
            "data.split=train",
        ],
        env_extra={"FASTSSL_CACHE": str(tmp_path / "cache")},
    )
    assert "4 unreadable image files left out" in p.stderr
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["epoch"] == 2 and ck["step"] == 2 * (51 // 16)  # 51 usable train images (2 of them converted)


def test_folder_with_nothing_usable_is_refused_before_training(tmp_path):
    root = tmp_path / "junk"
    os.makedirs(root / "x")
    (root / "x/a.jpg").write_text("no")
    (root / "x/b.png").write_bytes(b"\x89PNG")
    with pytest.raises(ConfigError, match=r"data.path: none of the 2 images .* can be decoded"):
        load_config(os.path.join(ROOT, "configs/sc/builtin.yaml"), ["data.source=folder", f"data.path={root}"])
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(ConfigError, match=r"data.path: no .jpg/.jpeg/.png images"):
        load_config(os.path.join(ROOT, "configs/sc/builtin.yaml"), ["data.source=folder", f"data.path={empty}"])
    p = run([PY, "-m", "fastssl.data.check", str(empty)], check=False)
    assert p.returncode == 2 and "no usable image" in p.stderr


def test_data_check_on_array_formats(tmp_path):
    from formats import write_cifar, write_stl10

    stl = tmp_path / "stl"
    write_stl10(stl)
    p = run([PY, "-m", "fastssl.data.check", str(stl)])
    assert "stl10" in p.stdout and "valid" in p.stdout
    with open(stl / "train_X.bin", "ab") as f:
        f.write(b"\0" * 100)  # no longer whole images
    p = run([PY, "-m", "fastssl.data.check", str(stl)], check=False)
    assert p.returncode == 2 and "train_X.bin" in p.stderr and "not a whole number" in p.stderr
    cif, _ = write_cifar(tmp_path / "cifar")
    with open(os.path.join(cif, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3000), np.uint8), b"labels": [0] * 10}, f)
    p = run([PY, "-m", "fastssl.data.check", str(tmp_path / "cifar")], check=False)
    assert p.returncode == 2 and "data_batch_2" in p.stderr and "(10, 3000)" in p.stderr


# --------------------------------------------------------------------------- config fuzzing

# key -> (strategy of invalid values); every one must be refused with a message naming the key
INVALID = {
    "data.batch_size": st.integers(max_value=1),
    "data.num_workers": st.integers(max_value=-1),
    "data.prefetch": st.integers(max_value=0),
    "data.source": st.sampled_from(["imagenet", "stl", "cifar", "folders", "mnist"]),
    "data.pipeline": st.sampled_from(["dali", "gpu", "cuda", "DALI-CPU", "none"]),
    "model.arch": st.sampled_from(["resnet", "vgg", "alexnet", "resnet34"]),
    "model.width": st.integers(max_value=0),
    "optim.lr": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(float("nan")), st.just(float("inf"))),
    "optim.momentum": st.one_of(
        st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
    ),
    "optim.weight_decay": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
    "optim.name": st.sampled_from(["adam", "lamb", "SGD"]),
    "train.epochs": st.integers(max_value=0),
    "train.max_steps": st.integers(max_value=0),
    "train.max_bad_steps": st.integers(max_value=0),
    "train.ckpt_every_steps": st.integers(max_value=0),
    "train.precision": st.sampled_from(["fp8", "half", "float16", "fp16"]),  # fp16 needs a GPU
    "eval.knn_k": st.integers(max_value=0),
    "eval.knn_temperature": st.floats(max_value=0.0, allow_nan=False),
    "method.patch_fraction": st.one_of(
        st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.001, allow_nan=False)
    ),
    "method.color.hue": st.one_of(
        st.floats(max_value=-1e-6, allow_nan=False), st.floats(min_value=180.001, allow_nan=False)
    ),
}


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_invalid_config_values_are_refused_naming_the_key(data):
    key = data.draw(st.sampled_from(sorted(INVALID)))
    if key == "train.precision" and torch.cuda.is_available():
        return
    value = data.draw(INVALID[key])
    built = []  # every torch module constructed while the config is checked (none may be)
    orig = torch.nn.Module.__init__
    torch.nn.Module.__init__ = lambda self, *a, **k: built.append(type(self)) or orig(self, *a, **k)
    try:
        with pytest.raises(ConfigError) as e:
            load_config(
                os.path.join(ROOT, "configs/sc/builtin.yaml"),
                [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"],
            )
    finally:
        torch.nn.Module.__init__ = orig
    assert str(e.value).startswith(key), (key, value, str(e.value))
    assert "\n" not in str(e.value) and not built


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(INVALID)), st.just(None), min_size=2, max_size=4), st.data())
def test_several_invalid_values_name_one_of_their_keys(keys, data):
    if "train.precision" in keys and torch.cuda.is_available():
        return
    overrides, named = [], set(keys)
    for k in keys:
        v = data.draw(INVALID[k])
        overrides.append(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs/sc/builtin.yaml"), overrides)
    assert any(str(e.value).startswith(k) for k in named), (overrides, str(e.value))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(2, 512),
    lr=st.floats(1e-5, 1.0),
    epochs=st.integers(1, 50),
    frac=st.floats(0.2, 1.0),
    hue=st.floats(0, 180),
    wd=st.floats(0, 0.1),
)
def test_valid_config_values_are_accepted(batch, lr, epochs, frac, hue, wd):
    cfg = load_config(
        os.path.join(ROOT, "configs/sc/builtin.yaml"),
        [
            f"data.batch_size={batch}",
            f"optim.lr={lr}",
            f"train.epochs={epochs}",
            f"method.patch_fraction={frac}",
            f"method.color.hue={hue}",
            f"optim.weight_decay={wd}",
        ],
    )
    assert cfg.data.batch_size == batch and cfg.train.epochs == epochs
