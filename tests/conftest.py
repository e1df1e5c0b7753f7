import os
import subprocess
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")

# A tiny run: 512 images of 32 px, 16-wide convnet, batch 32.
TINY = ["data.builtin.num_train=512", "data.builtin.num_test=256", "data.batch_size=32", "model.width=16",
        "train.progress=false", "train.log_every_steps=1", "data.num_workers=1"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(args, timeout=600, check=True, env_extra=None, **kw):
    e = env()
    e.update(env_extra or {})
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_cmd(out_dir, *overrides, config="configs/sc/builtin.yaml", nproc=None, tiny=True):
    """``fastssl/train.py`` on ``config``: shrunk to the TINY run, or (``tiny=False``) the config's
    own run without progress bar or TensorBoard (the learning tests)."""
    base = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    size = TINY if tiny else ["train.progress=false", "train.tensorboard=false"]
    return base + ["fastssl/train.py", "--config", config, f"out_dir={out_dir}", *size, *overrides]


def eval_trained_and_random(run_dir, protocol, *overrides):
    """``python -m fastssl.eval`` of ``run_dir``'s last checkpoint and of the same network
    untrained (``--random-init``): their result files, (trained, random)."""
    import json

    res = []
    for flag in ([], ["--random-init"]):
        run([PY, "-m", "fastssl.eval", "--checkpoint", str(os.path.join(run_dir, "checkpoints", "last.pt")),
             "--protocol", protocol, *flag, *overrides])
        with open(os.path.join(run_dir, f"eval_{protocol}{'_random' if flag else ''}.json")) as f:
            res.append(json.load(f))
    return tuple(res)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def kill_and_resume(tmp_path, common, config, kill_range):
    """The crash-resume experiment every method's test runs: an uninterrupted run, and the same
    run SIGKILLed after a random step in ``kill_range`` (low, high) then resumed.  Returns the
    reference's final checkpoint, the checkpoint left by the crash, the resumed run's final
    checkpoint and the kill step."""
    import signal

    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(train_cmd(ref, *common, config=config))
    kill_at = int(torch.randint(*kill_range, (1,)))
    p = run(train_cmd(out, *common, config=config), check=False, env_extra={"FASTSSL_KILL_AT_STEP": str(kill_at)})
    assert p.returncode == -signal.SIGKILL
    after_crash = load_ckpt(out / "checkpoints" / "last.pt")
    run(train_cmd(out, *common, config=config) + ["--resume"])
    return load_ckpt(ref / "checkpoints" / "last.pt"), after_crash, load_ckpt(out / "checkpoints" / "last.pt"), kill_at


@pytest.fixture
def tiny_cfg():
    from fastssl.config import load_config

    def make(*overrides, config=os.path.join(ROOT, "configs/sc/builtin.yaml")):
        return load_config(config, [*TINY, *overrides])

    return make
