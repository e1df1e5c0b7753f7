"""The README's demo: pre-train Spatial Contrasting on the built-in dataset, then compare the
learned features with a random-init network under the linear probe.

    python -m fastssl.demo [--out runs/demo] [--nproc N] [key=value ...]

Runs ``torchrun --standalone --nproc_per_node=N fastssl/train.py`` (N = all GPUs, or 2
processes on CPU), then ``python -m fastssl.eval --protocol linear`` twice, then writes the
run's report (``python -m fastssl.report``: curves, results, nearest-neighbour grid, filters)
and prints its path as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "sc", "builtin.yaml"))
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)  # a demo starts fresh
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    train = torchrun + [
        "--standalone",
        f"--nproc_per_node={a.nproc}",
        os.path.join(ROOT, "fastssl", "train.py"),
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
