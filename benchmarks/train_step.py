"""End-to-end training steps per method and pipeline: images/s and data-stall, as fastssl's
own metrics.jsonl reports them, for each data pipeline against the torchvision DataLoader.

    python -m benchmarks.train_step [--methods sc layerwise invp splitbrain] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import publish  # noqa: E402


def one(method, pipeline, steps, extra):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "fastssl", "train.py"), "--config",
               os.path.join(ROOT, "configs", method, "builtin.yaml"), f"out_dir={out}", f"train.max_steps={steps}",
               "train.log_every_steps=2", f"data.pipeline={pipeline}", "train.progress=false",
               "train.tensorboard=false", "train.ckpt_every_steps=100000", *extra]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"images_per_s"' in l]
    recs = recs[1:] or recs  # the first window holds start-up
    return {"method": method, "pipeline": pipeline, "steps": steps,
            "images_per_s": statistics.median(r["images_per_s"] for r in recs),
            "data_stall": statistics.median(r["data_stall"] for r in recs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sc", "layerwise", "invp", "splitbrain"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.batch_size=64")
    a = p.parse_args(argv)
    pipes = ["torch", "dali-cpu"] + (["dali-gpu"] if torch.cuda.is_available() else [])
    if not torch.cuda.is_available():
        print("  dali-gpu: skipped (no CUDA GPU on this machine)")
    rows = []
    for m in a.methods:
        for pipe in pipes:
            rows.append(one(m, pipe, a.steps, a.overrides))
            print(f"  train {m:10s} {pipe:9s} {rows[-1]['images_per_s']:8.0f} images/s  "
                  f"data-stall {rows[-1]['data_stall']:.1%}", flush=True)
        base = next(r for r in rows if r["method"] == m and r["pipeline"] == "torch")["images_per_s"]
        for r in rows:
            if r["method"] == m:
                r["ratio_vs_torch"] = r["images_per_s"] / base
    lines = ["| method | pipeline | images/s (median) | data-stall | vs torch DataLoader |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['pipeline']} | {r['images_per_s']:.0f} | {r['data_stall']:.1%} | "
              f"{r['ratio_vs_torch']:.2f}x |" for r in rows]
    table = "\n".join(lines) + f"\n\nOne process, each method's built-in config, {a.steps} steps; medians over logging windows after the first."
    publish("train_step", rows, table, a.out, [f"{r['method']} {r['pipeline']}" for r in rows],
            [r["ratio_vs_torch"] for r in rows], "training images/s vs torchvision DataLoader", "end-to-end training step")


if __name__ == "__main__":
    main()
