"""Install fastssl as a user does and use it from outside any checkout (issue 33).

    python .ci/install_check.py [SRC] [--work DIR] [--keep]

1. builds the wheel of the source tree SRC (default: this checkout) with pip, as ``pip install .``
   or ``pip install git+...`` would, from a copy of the tree (the checkout gets no build/ folder);
2. checks that the wheel holds every package folder of SRC's fastssl/ (each with an
   ``__init__.py``) and every shipped config (``fastssl/configs/<method>/<name>.yaml``);
3. makes a fresh virtual environment that sees the packages of the Python running this script
   (torch, DALI, FAISS ... are reused, not downloaded; fastssl itself is hidden from it) and
   installs the wheel there with pip, offline (``--no-index``), so pip checks the wheel's
   dependencies against what is installed and installs fastssl alone;
4. from an empty folder outside the checkout, with no PYTHONPATH, runs ``fastssl --version``,
   ``fastssl configs`` and two training steps of ``fastssl train --config sc/builtin``, and
   checks that the installed copy (not a checkout) ran.

Exit status 0 when all of it works, 1 with the failing step's output otherwise.  Uses only the
standard library and pip; about half a minute on a 2-core CPU.  tests/test_install.py runs it
(slow tier, so in CI).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a copy of the source tree leaves out: build products, environments, runs, VCS data
SKIP = (".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results")
TRAIN = [
    "data.builtin.num_train=512",
    "data.builtin.num_test=256",
    "data.batch_size=32",
    "model.width=16",
    "data.num_workers=1",
    "train.max_steps=2",
    "train.progress=false",
    "train.tensorboard=false",
]


class Failed(Exception):
    pass


def sh(cmd, cwd, env=None, timeout=600, what=None):
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    label = what or " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))
    print(f"  {label}: exit {p.returncode} ({time.perf_counter() - t:.1f} s)", flush=True)
    if p.returncode != 0:
        raise Failed(f"{label} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def package_dirs(src: str) -> list:
    """fastssl's packages in SRC: every folder under fastssl/ with an __init__.py, as a/b paths."""
    out = []
    for d, dirs, files in os.walk(os.path.join(src, "fastssl")):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        if "__init__.py" in files:
            out.append(os.path.relpath(d, src).replace(os.sep, "/"))
    return sorted(out)


def shipped_configs(src: str) -> list:
    base = os.path.join(src, "fastssl", "configs")
    return sorted(os.path.relpath(p, src).replace(os.sep, "/") for p in glob.glob(os.path.join(base, "*", "*.yaml")))


def build_wheel(src: str, work: str) -> str:
    tree = os.path.join(work, "src")
    shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns(*SKIP))
    dist = os.path.join(work, "dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist, tree]
    try:  # this environment's setuptools when it has one new enough (no download), else pip's isolated build
        import setuptools

        if tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:1]) >= (68,):
            cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    sh(cmd, cwd=work, what="pip wheel")
    wheels = glob.glob(os.path.join(dist, "fastssl-*.whl"))
    if len(wheels) != 1:
        raise Failed(f"pip wheel made {len(wheels)} fastssl wheels in {dist}")
    return wheels[0]


def check_wheel(wheel: str, src: str) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"{d}/__init__.py" for d in package_dirs(src) if f"{d}/__init__.py" not in names]
    missing += [c for c in shipped_configs(src) if c not in names]
    if not shipped_configs(src):
        missing.append("fastssl/configs/<method>/<name>.yaml (the source tree ships no configs)")
    if missing:
        raise Failed(f"the wheel {os.path.basename(wheel)} lacks {len(missing)} files: {', '.join(missing[:8])}")
    print(f"  wheel: {os.path.basename(wheel)}, {os.path.getsize(wheel) / 1024:.0f} KiB, every package and config")


def make_env(work: str) -> str:
    """A fresh venv whose sys.path ends with a view of this Python's site-packages without fastssl."""
    venv = os.path.join(work, "venv")
    sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, what="python -m venv")
    view = os.path.join(work, "site-view")  # symlinks to every installed package except fastssl's own files
    os.makedirs(view)
    seen = set()
    for key in ("purelib", "platlib"):
        site = sysconfig.get_paths()[key]
        for name in sorted(os.listdir(site)) if os.path.isdir(site) else ():
            low = name.lower()
            if name in seen or low.startswith(("fastssl", "__editable__")) or low.endswith((".pth", ".egg-link")):
                continue
            seen.add(name)
            os.symlink(os.path.join(site, name), os.path.join(view, name))
    py = os.path.join(venv, "bin", "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    with open(os.path.join(purelib, "_reuse_installed.pth"), "w") as f:
        f.write(view + "\n")
    return venv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", default=HERE, help="the source tree to build (default: this checkout)")
    p.add_argument("--work", help="the folder to work in (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    src = os.path.abspath(a.src)
    work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="fastssl-install-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    print(f"install check of {src} in {work}", flush=True)
    try:
        wheel = build_wheel(src, work)
        check_wheel(wheel, src)
        venv = make_env(work)
        bin_ = os.path.join(venv, "bin")
        sh(
            [sys.executable, "-m", "pip", "--python", os.path.join(bin_, "python"), "install", "--quiet"]
            + ["--no-index", "--find-links", os.path.dirname(wheel), wheel],
            cwd=work,
            what="pip install (offline: the dependencies must be installed already)",
        )
        outside = os.path.join(work, "outside")  # an empty folder: no checkout, no configs/ beside it
        os.makedirs(outside)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = bin_ + os.pathsep + env.get("PATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        fastssl = os.path.join(bin_, "fastssl")
        where = sh([os.path.join(bin_, "python"), "-c", "import fastssl; print(fastssl.__file__)"], outside, env)
        if not where.stdout.strip().startswith(venv):
            raise Failed(f"the venv imported fastssl from {where.stdout.strip()}, not from its own install")
        version = sh([fastssl, "--version"], outside, env).stdout.strip()
        want = re.search(r'__version__ = "([^"]+)"', open(os.path.join(src, "fastssl", "__init__.py")).read())
        if not want or version != f"fastssl {want.group(1)}":
            raise Failed(f"fastssl --version printed {version!r}, expected 'fastssl {want and want.group(1)}'")
        listing = sh([fastssl, "configs"], outside, env).stdout
        if not re.search(r"^sc/builtin\s+\S", listing, re.M):
            raise Failed(f"fastssl configs does not list sc/builtin:\n{listing[-2000:]}")
        sh([fastssl, "train", "--config", "sc/builtin", "out_dir=run", *TRAIN], outside, env, what="fastssl train")
        ck = os.path.join(outside, "run", "checkpoints", "last.pt")
        if not os.path.isfile(ck):
            raise Failed(f"fastssl train wrote no checkpoint at {ck}")
        step = sh(
            [
                os.path.join(bin_, "python"),
                "-c",
                f"import torch; print(torch.load({ck!r}, weights_only=False)['step'])",
            ],
            outside,
            env,
        )
        if step.stdout.strip() != "2":
            raise Failed(f"the checkpoint is at step {step.stdout.strip()}, expected 2")
    except (Failed, subprocess.TimeoutExpired) as e:
        print(f"install check FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"install check passed ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
