"""The README's demo: pre-train Spatial Contrasting on the built-in dataset, then compare the
learned features with a random-init network under the linear probe.

    python -m fastssl.demo [--out runs/demo] [--force] [--nproc N] [key=value ...]

Runs ``torchrun --standalone --nproc_per_node=N fastssl/train.py`` (N = all GPUs, or 2
processes on CPU) on the shipped config ``sc/builtin``, then ``python -m fastssl.eval
--protocol linear`` twice, then writes the run's report (``python -m fastssl.report``: curves,
results, nearest-neighbour grid, filters) and prints its path as the last line.

A demo starts fresh: it replaces ``--out`` when that folder is empty or holds an earlier demo
run (marked by the file ``.fastssl-demo``), and refuses any other non-empty folder unless
``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
MARKER = ".fastssl-demo"  # written into --out: the folder is a demo run, which the next demo may replace


def prepare_out(out: str, force: bool) -> str | None:
    """Empty ``out`` for a new demo; None when done, else why it is refused (one line)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: exists and is not a folder"
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and MARKER not in entries and not force:
        return (
            f"--out {out}: the folder is not empty ({len(entries)} entries, e.g. {entries[0]}) and is not an "
            f"earlier demo run; choose another --out, or pass --force to delete it and start there"
        )
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    open(os.path.join(out, MARKER), "w").close()
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds something else than a demo")
    p.add_argument("--config", default="sc/builtin", help="a shipped config's name or a YAML file")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    why = prepare_out(a.out, a.force)  # a demo starts fresh
    if why:
        print(f"fastssl demo: {why}", file=sys.stderr)
        return 2
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    train = torchrun + [
        "--standalone",
        f"--nproc_per_node={a.nproc}",
        TRAIN_SCRIPT,
        "--config",
        a.config,
        f"out_dir={a.out}",
        *a.overrides,
    ]
    print("$", " ".join(train[2:]), flush=True)
    if subprocess.call(train) != 0:
        return 1
    ck = os.path.join(a.out, "checkpoints", "last.pt")
    results = {}
    for name, extra in (("SC pre-trained", []), ("random init", ["--random-init"])):
        cmd = [sys.executable, "-m", "fastssl.eval", "--checkpoint", ck, "--protocol", "linear", *extra]
        print("$", " ".join(["python"] + cmd[1:]), flush=True)
        if subprocess.call(cmd) != 0:
            return 1
        with open(os.path.join(a.out, "eval_linear" + ("_random" if extra else "") + ".json")) as f:
            results[name] = json.load(f)
    print("\nLinear probe on the built-in set's test images (frozen features):")
    for name, r in results.items():
        print(f"  {name:15s} {r['accuracy']:6.2f}% +- {r['std']:.2f}  ({len(r['runs'])} seeds)")
    gain = results["SC pre-trained"]["accuracy"] - results["random init"]["accuracy"]
    print(f"  SC gain         {gain:+6.2f} points")
    print(flush=True)
    from fastssl import report  # (only reads the run folder: the numbers above are final)

    if report.main([a.out]) != 0:
        return 1
    print(os.path.join(a.out, "report.md"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
