"""The tests' shared helpers, imported as ``from conftest import ...`` (no test file imports
another): running a config (``run``, ``train_cmd``, ``kill_and_resume``, ``eval_trained_and_random``),
reading a run's metrics (``read_metrics``, ``step_records``, ``epoch_records``), building and running
a DALI graph (``run_dali_graph``, ``dali_patches``) and the executor comparison (``executors``,
``reference``).

The tiers are markers on the tests themselves (declared in pyproject.toml): ``@pytest.mark.slow``
on a test that trains, benchmarks or compiles in subprocesses, over ~5 s of one worker on the
2-core CPU (measured with --durations; a new test that slow gets the marker too), ``ddp`` on one
that starts several processes (torchrun, torch.distributed with gloo), ``learning`` on one that
trains a method and checks that its features beat a random-init network's; ``pytestmark`` where
a whole file is one tier.  Fast tier, for the edit loop (about 1 minute on 2 workers):
pytest -n 2 -m "not slow" tests
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")

# A tiny run: 512 images of 32 px, 16-wide convnet, batch 32.
TINY = [
    "data.builtin.num_train=512",
    "data.builtin.num_test=256",
    "data.batch_size=32",
    "model.width=16",
    "train.progress=false",
    "train.log_every_steps=1",
    "data.num_workers=1",
]


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
    res = []
    for flag in ([], ["--random-init"]):
        run(
            [
                PY,
                "-m",
                "fastssl.eval",
                "--checkpoint",
                str(os.path.join(run_dir, "checkpoints", "last.pt")),
                "--protocol",
                protocol,
                *flag,
                *overrides,
            ]
        )
        with open(os.path.join(run_dir, f"eval_{protocol}{'_random' if flag else ''}.json")) as f:
            res.append(json.load(f))
    return tuple(res)


def blocked_imports(folder, *modules) -> dict:
    """Environment additions that make ``import <module>`` (and its sub-modules) raise
    ModuleNotFoundError (naming the module, as Python's own does) in a child process and in every
    process it starts (torchrun workers, the doctor's components), as on a machine without the
    package: a ``sitecustomize`` in ``folder``, first on PYTHONPATH, puts a finder at the front of
    ``sys.meta_path``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(
            "import sys\n"
            f"BLOCKED = {tuple(modules)!r}\n"
            "class _Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if any(name == m or name.startswith(m + '.') for m in BLOCKED):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
            "sys.meta_path.insert(0, _Block())\n"
        )
    return {"PYTHONPATH": str(folder) + os.pathsep + ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def read_metrics(run_dir) -> list:
    """The records of ``run_dir``'s ``metrics.jsonl``, in the order written (one dict a line)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_records(run_dir) -> list:
    """The training steps' records (``MetricsLogger.log``): those with a ``loss``."""
    return [r for r in read_metrics(run_dir) if "loss" in r]


def epoch_records(run_dir, *keys) -> list:
    """The epoch records (``MetricsLogger.log_epoch``: no ``loss``), those carrying every one of
    ``keys`` when given."""
    return [r for r in read_metrics(run_dir) if "loss" not in r and all(k in r for k in keys)]


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


def run_dali_graph(images, graph):
    """``graph`` (DALI ``fn`` calls on one input, returning a list of outputs) as a CPU pipeline
    on one batch of ``images`` (HWC uint8): each output stacked, (n, ...)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        return tuple(graph(fn.external_source(source=lambda: images, batch=True)))

    p = pipe()
    p.build()
    return [np.stack([np.asarray(o[i]) for i in range(len(images))]) for o in p.run()]


def dali_patches(images, recipe, columns):
    """The DALI surrogate-patch graph of ``recipe`` (CPU backend) on one batch of ``images``
    with explicit parameters (``columns``: for each parameter input the graph reads, in its
    order, the images' values, one array each): (n, P, P, 3) uint8."""
    from fastssl.data.executors.dali import build_dali_pipeline

    class Src:
        def __iter__(self):
            self.done = False
            return self

        def __next__(self):
            if self.done:
                raise StopIteration
            self.done = True
            return [[np.ascontiguousarray(i) for i in images], [np.array([k]) for k in range(len(images))]] + [
                list(c) for c in columns
            ]

    pipe = build_dali_pipeline(
        Src(), recipe, "cpu", len(images), 1, None, images[0].shape[0], False, (0.5,) * 3, (0.25,) * 3
    )
    pipe.build()
    out, _ = pipe.run()
    return np.stack([np.asarray(out[i]) for i in range(len(images))])


# The executor comparison (test_ops.py, and the guide's example recipe in test_guide.py): the
# base size, mean and std of the executors' views.
EXECUTOR_SIZE, EXECUTOR_MEAN, EXECUTOR_STD = 24, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def executors(split, r, batch=16):
    """Every executor present here on ``split`` and recipe ``r``, by name."""
    from fastssl.data.executors.dali import DaliExecutor
    from fastssl.data.executors.dataloader import TorchExecutor
    from fastssl.data.executors.tensor import TensorExecutor

    common = dict(
        split=split, recipe=r, batch_size=batch, seed=3, rank=0, world=1, mean=EXECUTOR_MEAN, std=EXECUTOR_STD
    )
    return {
        "dali-cpu": DaliExecutor(**common, device="cpu", base_size=EXECUTOR_SIZE, num_threads=1),
        "torch": TorchExecutor(**common, base_size=EXECUTOR_SIZE, num_workers=0),
        "tensor": TensorExecutor(**common, device="cpu"),
    }


def reference(images, r, epoch, batch=16):
    """The torch faces applied directly to the plan: the maths every executor must reproduce."""
    from fastssl.data.executors.base import run_torch
    from fastssl.data.ops import ViewContext
    from fastssl.data.plan import make_epoch_plan

    plan = make_epoch_plan(len(images), batch, r.draw, 3, epoch)
    ctx = ViewContext(r.size, EXECUTOR_MEAN, EXECUTOR_STD)
    for k in range(plan.steps):
        s = plan.step(k)
        yield s.index, run_torch(r, torch.from_numpy(images[s.index]).permute(0, 3, 1, 2), s, ctx)
