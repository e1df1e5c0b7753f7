"""Installing fastssl as users do (issue 33): the packaging in pyproject.toml, the wheel, configs by
name, a core install without DALI or FAISS, and the messages a new user meets first."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import fastssl
from conftest import PY, ROOT, TINY, blocked_imports, run

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
FASTSSL = [PY, "-m", "fastssl"]
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def blocked_env(tmp_path, *modules):
    """A core install: ``modules`` unimportable (conftest's blocker) and a cache of its own."""
    return {**blocked_imports(tmp_path / "blocker", *modules), "FASTSSL_CACHE": str(tmp_path / "cache")}


# --------------------------------------------------------------------------- packaging


def test_pyproject_is_the_packaging_and_the_version_lives_in_one_place():
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))
    proj = PYPROJECT["project"]
    assert proj["name"] == "fastssl" and proj["dynamic"] == ["version"] and "version" not in proj
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastssl.__version__"}
    assert isinstance(PYPROJECT["tool"]["setuptools"]["packages"], dict)  # discovery ({find}), no hand-written list
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["fastssl*"]
    assert proj["scripts"]["fastssl"] == "fastssl.cli:main"
    p = run(FASTSSL + ["--version"])
    assert p.stdout.strip() == f"fastssl {fastssl.__version__}"


def test_discovery_finds_every_package_folder_and_the_configs_are_package_data():
    from setuptools import find_packages

    found = set(find_packages(ROOT, include=["fastssl*"]))
    folders = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "fastssl"))
        if "__init__.py" in files and "__pycache__" not in d
    }
    assert {"fastssl.data.ops", "fastssl.data.executors", "fastssl.kernels"} <= folders
    assert found == folders
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["fastssl"] == ["configs/*/*.yaml"]
    # the checkout's configs/ is the package's folder (one copy of each file)
    assert os.path.realpath(os.path.join(ROOT, "configs")) == os.path.join(ROOT, "fastssl", "configs")


def test_core_install_has_no_gpu_wheel_and_the_extras_match_their_cuda():
    core = PYPROJECT["project"]["dependencies"]
    assert not [d for d in core if re.match(r"(nvidia-|faiss)", d)], core
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"cpu", "cu12", "cu13", "test"} <= set(extras)

    def names(extra):
        return {re.split(r"[<>=!~ ;\[]", r)[0] for r in extras[extra]}

    assert names("cpu") == {"nvidia-dali-cuda130", "faiss-cpu"}  # DALI ships CUDA builds only; its CPU backend
    assert names("cu12") == {"nvidia-dali-cuda120", "faiss-gpu"}  # faiss-gpu: Meta's wheel, CUDA 12
    assert names("cu13") == {"nvidia-dali-cuda130", "faiss-cuda"}
    assert "faiss-cuda==1.14.1.post4" in extras["cu13"]  # its CUDA 13 build (later releases are CUDA 12 again)


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout():
    """.ci/install_check.py: build the wheel, install it into a fresh environment that reuses the
    installed torch, then fastssl --version, fastssl configs and 2 training steps of sc/builtin
    from an empty folder.  (It failed on the wheel of 6697559: fastssl.data.ops and .executors missing.)"""
    p = subprocess.run(
        [PY, os.path.join(ROOT, ".ci", "install_check.py"), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "install check passed" in p.stdout


# --------------------------------------------------------------------------- configs by name


def test_configs_by_name_path_and_listing(tmp_path):
    from fastssl import config_files
    from fastssl.config import load_config
    from fastssl.errors import ConfigError

    by_path = load_config(os.path.join(ROOT, "configs", "sc", "builtin.yaml"))
    for name in ("sc/builtin", "sc/builtin.yaml", "configs/sc/builtin.yaml"):
        assert load_config(name) == by_path
    mine = tmp_path / "sc" / "builtin.yaml"  # a file that exists is read as it is, even under a shipped name
    mine.parent.mkdir()
    mine.write_text("method:\n  name: sc\ntrain:\n  epochs: 3\n")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert load_config("sc/builtin.yaml").train.epochs == 3
    finally:
        os.chdir(cwd)
    with pytest.raises(ConfigError, match=r"^--config: file not found: sc/nope, .* \(sc/builtin, sc/cifar10"):
        load_config("sc/nope")
    names = config_files.names()
    shipped = sorted(
        f"{m}/{f[:-5]}"
        for m in os.listdir(config_files.CONFIG_DIR)
        for f in os.listdir(os.path.join(config_files.CONFIG_DIR, m))
    )
    assert names == shipped and "sc/builtin" in names
    p = run(FASTSSL + ["configs"])
    for n in names:
        line = re.search(rf"^{re.escape(n)}\s+(.+)$", p.stdout, re.M)
        assert line and len(line.group(1)) > 10, f"no header for {n}"
    assert re.search(r"^sc/builtin\s+Spatial Contrasting on the built-in", p.stdout, re.M)
    p = run(FASTSSL + ["configs", "sc/builtin"])
    assert p.stdout == open(os.path.join(ROOT, "configs", "sc", "builtin.yaml")).read()
    p = run(FASTSSL + ["configs", "sc/nope"], check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "sc/nope" in p.stderr


# --------------------------------------------------------------------------- a core install

# One process of a core install (nvidia.dali and faiss blocked): eval knn, export, report and the
# doctor's FAISS row through the `fastssl` command's own entry point, then Exemplar-CNN's clustering
# past its linkage cap (k-means parts: scikit-learn's without FAISS).
CORE_TOOLS = """
import sys, numpy as np
from fastssl import cli, doctor
from fastssl.methods.exemplar.cluster import complete_linkage
run, ck, out = sys.argv[1:4]
for mod in ("nvidia.dali", "faiss"):
    try:
        __import__(mod)
        raise SystemExit(mod + " imports")
    except ModuleNotFoundError:
        pass
assert cli.main(["eval", "--checkpoint", ck, "--protocol", "knn"]) == 0
assert cli.main(["export", "--checkpoint", ck, "--format", "state_dict", "--out", out]) == 0
assert cli.main(["report", run, "--gallery", "100"]) == 0
print("doctor faiss:", doctor.work_faiss())
print("doctor", doctor.versions()["extra"])
f = np.random.default_rng(0).normal(size=(300, 8)).astype("float32")
lab = complete_linkage(f, 2.0, max_images=100, seed=0)
print("clusters", len(lab), lab.min())
"""


@pytest.mark.slow
def test_core_install_without_dali_or_faiss_trains_evaluates_and_reports(tmp_path):
    """A short SC run on a core install (nvidia.dali and faiss blocked; torch pipeline, one epoch,
    so the kNN monitor runs at its end), then eval knn, export, report, the doctor's FAISS row and
    the clustering: all work, the torch kNN said once per process.  Then the same checkpoint read
    where triton is missing: eval, export and report work (the losses import no triton); and a
    checkpoint that needs a module missing here: they name the module instead of calling the file
    corrupt."""
    env = blocked_env(tmp_path, "nvidia.dali", "faiss")
    out = tmp_path / "run"
    tiny = [t for t in TINY if not t.startswith("data.builtin.num_train")]
    p = run(
        FASTSSL
        + ["train", "--config", "sc/builtin", f"out_dir={out}", *tiny, "data.builtin.num_train=128"]
        + ["train.epochs=1", "data.pipeline=torch", "train.tensorboard=false", "train.monitor_bank=128"],
        env_extra=env,
    )
    assert p.stderr.count("FAISS is not installed: kNN search runs exact on torch") == 1, p.stderr
    assert "knn_monitor" in (out / "metrics.jsonl").read_text()
    ck = str(out / "checkpoints" / "last.pt")
    p = run([PY, "-c", CORE_TOOLS, str(out), ck, str(tmp_path / "b.pt")], env_extra=env)
    assert "knn accuracy" in p.stdout and p.stderr.count("FAISS is not installed") == 1, p.stderr
    assert (tmp_path / "b.pt").is_file() and (out / "report.md").is_file()
    assert "doctor faiss: ('not available', 'FAISS is not installed" in p.stdout
    assert re.search(r"^doctor cpu \(no CUDA GPU visible: install fastssl with its \[cpu\] extra\)", p.stdout, re.M)
    assert "clusters 300 0" in p.stdout

    code = (
        "import sys; from fastssl import cli; "
        "sys.exit(max(cli.main(a) for a in ([%r, '--checkpoint', %r, '--protocol', 'knn'], "
        "[%r, '--checkpoint', %r, '--out', %r], [%r, %r])))"
    )
    run(
        [PY, "-c", code % ("eval", ck, "export", ck, str(out / "b.pt"), "report", str(out))],
        env_extra=blocked_env(tmp_path / "no-triton", "triton"),
    )  # (exit 0: no triton needed to read it)

    # a checkpoint whose pickle names a module this installation lacks (e.g. a plugin method's)
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "fastssl_plugin_method.py").write_text("class PluginConfig:\n    pass\n")
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("report*", "tb"))
    ck2 = str(other / "checkpoints" / "last.pt")
    run(
        [
            PY,
            "-c",
            "import sys, torch, fastssl_plugin_method as m; c = torch.load(sys.argv[1], weights_only=False); "
            "c['plugin'] = m.PluginConfig(); torch.save(c, sys.argv[1])",
            ck2,
        ],
        env_extra={"PYTHONPATH": f"{plugin}{os.pathsep}{ROOT}"},
    )
    p = run([PY, "-c", code % ("eval", ck2, "export", ck2, str(other / "b.pt"), "report", str(other))], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if ck2 in x]
    assert len(lines) == 3, p.stderr[-3000:]  # one line from each tool
    for line in lines:
        assert "needs the Python module 'fastssl_plugin_method'" in line and "corrupt" not in line, line


def test_torch_index_equals_faiss_flat():
    from fastssl import knn

    if not knn.have_faiss():
        pytest.skip("FAISS is not installed here")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    q = torch.randn(40, 16, generator=g)
    for metric in ("ip", "l2"):
        fv, fi = knn.KNNIndex(x, metric).search(q, 7)
        tv, ti = knn.TorchIndex(x, metric).search(q, 7)
        assert torch.equal(fi, ti) and torch.allclose(fv, tv, atol=1e-4)


# --------------------------------------------------------------------------- what a new user meets


@pytest.mark.parametrize("args", [["train", "--help"], ["check", "--help"], ["configs"], ["--help"]])
def test_output_into_a_closed_pipe_ends_quietly(args):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        p = subprocess.run(FASTSSL + args, stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    from fastssl import demo

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    assert demo.main(["--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "thesis.tex" in err
    assert (mine / "thesis.tex").read_text() == "keep me"
    earlier = tmp_path / "demo"  # an earlier demo (its marker) is replaced; so is an empty folder
    earlier.mkdir()
    (earlier / demo.MARKER).touch()
    (earlier / "old.txt").touch()
    assert demo.prepare_out(str(earlier), force=False) is None
    assert sorted(os.listdir(earlier)) == [demo.MARKER]
    assert demo.prepare_out(str(tmp_path / "new"), force=False) is None
    assert demo.prepare_out(str(mine), force=True) is None and not (mine / "thesis.tex").exists()


def test_train_nproc_config_error_is_one_line_before_torchrun(tmp_path, capsys):
    from fastssl import cli

    bad = ["--config", "sc/builtin", f"out_dir={tmp_path}", "method.patch_fraction=7"]
    assert cli.main(["train", "--nproc", "2", *bad]) == 2  # (a valid config would start torchrun here)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastssl: config error: method.patch_fraction"), err
    assert not (tmp_path / "config.yaml").exists() and "WORLD_SIZE" not in os.environ
    # checked as the N ranks will see it: the global batch against the images
    over = ["data.builtin.num_train=512", "data.batch_size=128"]
    assert cli.main(["train", "--nproc", "8", "--config", "sc/builtin", f"out_dir={tmp_path}", *over]) == 2
    assert "data.batch_size: 128 x 8 processes is more than the 512" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ddp
def test_train_nproc_ctrl_c_stops_every_rank_with_a_checkpoint(tmp_path):
    """Ctrl-C (SIGINT to the fastssl process) under --nproc 2: every rank finishes its step and
    the run ends as a single process does: one line, a checkpoint, exit 0, no torchrun traceback."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        FASTSSL
        + ["train", "--nproc", "2", "--config", "sc/builtin", f"out_dir={out}", *TINY, "train.epochs=50"]
        + ["data.pipeline=torch", "train.tensorboard=false"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    try:
        import time

        t0 = time.time()
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() - t0 < 240:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        so, se = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, se[-3000:]
    assert "Traceback" not in se and "SignalException" not in se, se[-3000:]
    assert "SIGINT: checkpoint written at step" in so + se and "continue with --resume" in so + se
    assert (out / "checkpoints" / "last.pt").is_file()
    assert sys.platform.startswith("linux")


def test_status_lines_by_time_from_the_first_step(tmp_path, monkeypatch, capsys):
    """No progress bar (a log file): a status line after the first step, whatever
    train.log_every_steps is, then one whenever STATUS_EVERY_S has passed; slow rates are not "0"."""
    from fastssl.engine import metrics

    log = metrics.MetricsLogger(str(tmp_path), True, total_steps=100, initial_step=0, tensorboard=False, progress=True)
    assert log.bar is None  # (stderr is not a terminal under pytest)
    log.advance()
    first = capsys.readouterr().out
    assert re.fullmatch(r"step 1/100: [\d.]+ m?s/step, \d+ s to go\n", first), first
    log.advance()
    assert capsys.readouterr().out == ""  # not due yet
    rec = {"step": 2, "epoch": 0.02, "loss": 3.5, "lr": 0.1, "images_per_s": 0.42, "data_stall": 0.01}
    log.log(rec)  # a logged step within the 30 s: in metrics.jsonl, not on the console
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(metrics, "STATUS_EVERY_S", 0.0)
    log.advance()
    line = capsys.readouterr().out
    assert line.startswith("step 3/100: ") and "at step 2: loss 3.5000, 0.42 img/s, data-stall 1%" in line
    log.log({**rec, "step": 100, "images_per_s": 0.004})
    assert "0.004 img/s" in capsys.readouterr().out
    assert [metrics.rate(x) for x in (1234.4, 12.34, 0.42, 0.0)] == ["1234", "12.3", "0.42", "0"]
    log.log_epoch({"step": 100, "epoch": 1, "ranks_agree": 1.0}, echo=False)
    assert capsys.readouterr().out == ""
    log.close()
    assert '"ranks_agree": 1.0' in (tmp_path / "metrics.jsonl").read_text()


def test_check_says_the_classes_and_splits_it_found(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog", "fox"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (30 * i, 80, 0)).save(tmp_path / "d" / split / cls / f"{i}.png")
    env = {"FASTSSL_CACHE": str(tmp_path / "cache")}
    p = run(FASTSSL + ["check", str(tmp_path / "d")], env_extra=env)
    assert (
        f"{tmp_path / 'd'}: as training reads it: 3 classes (cat, dog, fox); splits train 6, val 6, unlabeled 0; "
        "pre-training sees 6 images" in p.stdout
    )
    p = run(FASTSSL + ["check", str(tmp_path / "d" / "train" / "cat")], env_extra=env)
    assert "no class folders (unlabeled" in p.stdout and "one split (2 images" in p.stdout
