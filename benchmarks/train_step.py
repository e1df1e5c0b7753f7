"""End-to-end training steps per method and pipeline: images/s and data-stall, as fastssl's
own metrics.jsonl reports them, for each data pipeline against the torchvision DataLoader.

    python -m benchmarks.train_step [--methods NAME ...] [--steps 30]
                                    [--pipelines torch dali-cpu dali-gpu] [key=value ...]
    python -m benchmarks.train_step --compare-impls [--methods NAME ...] [--precisions fp32 bf16]
                                    [--steps 5] [--jobs 4] [key=value ...]

``--methods`` defaults to the methods that declare "train_step" (or, with ``--compare-impls``,
"compare-impls") in their ``benchmarks`` (fastssl.methods.for_tools).

The first form writes train_step.{json,md,png}; a run that fails gives an error row (with the
training process's last stderr lines, also printed) and the exit status 1, after the others ran.
``--compare-impls`` trains each method with ``loss.impl=fused`` and ``loss.impl=eager`` from the
same seed, per precision, and reports the per-step relative difference of the logged losses
(step 1: the same weights and data, so only the loss implementation differs; later steps also
carry the earlier steps' rounding): train_losses.{json,md,png}.  Without a GPU the fused
kernels run under the Triton interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import emit, publish  # noqa: E402

PIPELINES = ("torch", "dali-cpu", "tensor", "dali-gpu")
# The fused-vs-eager verdict: the largest per-step relative loss difference allowed, per precision.
LOSS_TOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}


class TrainFailed(RuntimeError):
    """A training subprocess exited non-zero; the message ends with its last stderr lines."""


def _train(method, steps, extra, env_extra=None, config=None):
    """fastssl/train.py on ``config`` (default: the method's built-in config) for ``steps`` steps:
    its metrics.jsonl records."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "fastssl", "train.py"),
            "--config",
            os.path.join(ROOT, config or os.path.join("configs", method, "builtin.yaml")),
            f"out_dir={out}",
            f"train.max_steps={steps}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.ckpt_every_steps=100000",
            *extra,
        ]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            tail = "\n".join(p.stderr.rstrip().splitlines()[-20:])
            raise TrainFailed(f"{method} ({' '.join(extra)}) exited {p.returncode}; its stderr ends:\n{tail}")
        return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def one(method, pipeline, steps, extra):
    recs = _train(method, steps, ["train.log_every_steps=2", f"data.pipeline={pipeline}", *extra])
    recs = [r for r in recs if "images_per_s" in r]
    recs = recs[1:] or recs  # the first window holds start-up
    return {
        "method": method,
        "pipeline": pipeline,
        "steps": steps,
        "images_per_s": statistics.median(r["images_per_s"] for r in recs),
        "data_stall": statistics.median(r["data_stall"] for r in recs),
    }


def _first_line(s):
    return next((ln for ln in str(s).splitlines() if ln.strip()), "")


def throughput(a) -> int:
    cuda = torch.cuda.is_available()
    pipes = a.pipelines or (["torch", "dali-cpu", "tensor"] + (["dali-gpu"] if cuda else []))
    if not cuda and "dali-gpu" in pipes:
        pipes = [p for p in pipes if p != "dali-gpu"]
    if not cuda:
        print("  dali-gpu: skipped (no CUDA GPU on this machine)")
    rows, failed = [], 0
    for m in a.methods:
        for pipe in pipes:
            try:
                rows.append(one(m, pipe, a.steps, a.overrides))
                emit(rows[-1])
                print(
                    f"  train {m:10s} {pipe:9s} {rows[-1]['images_per_s']:8.0f} images/s  "
                    f"data-stall {rows[-1]['data_stall']:.1%}",
                    flush=True,
                )
            except Exception as e:  # one failing run gives an error row; the others still run
                failed += 1
                rows.append({"method": m, "pipeline": pipe, "steps": a.steps, "error": _first_line(e)})
                print(f"  train {m:10s} {pipe:9s} FAILED: {e}", file=sys.stderr, flush=True)
        base = next((r for r in rows if r["method"] == m and r["pipeline"] == "torch" and "error" not in r), None)
        for r in rows:
            if r["method"] == m and "error" not in r:
                r["ratio_vs_torch"] = r["images_per_s"] / base["images_per_s"] if base else None
    lines = ["| method | pipeline | images/s (median) | data-stall | vs torch DataLoader |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['pipeline']} | failed: {r['error'].replace('|', '/')} | - | - |")
        else:
            ratio = f"{r['ratio_vs_torch']:.2f}x" if r.get("ratio_vs_torch") else "-"
            lines.append(
                f"| {r['method']} | {r['pipeline']} | {r['images_per_s']:.0f} | {r['data_stall']:.1%} | {ratio} |"
            )
    table = (
        "\n".join(lines)
        + f"\n\nOne process, each method's built-in config, {a.steps} steps; medians over logging windows after the first."
    )
    if a.overrides:
        table += f" Overrides: `{' '.join(a.overrides)}`."
    ok = [r for r in rows if "error" not in r]
    publish(
        "train_step",
        rows,
        table,
        a.out,
        [f"{r['method']} {r['pipeline']}" for r in ok],
        [r.get("ratio_vs_torch") or 0.0 for r in ok],
        "training images/s vs torchvision DataLoader",
        "end-to-end training step",
    )
    return 1 if failed else 0


def rel_diffs(fused, eager):
    return [
        abs(f - e) / max(abs(e), 1e-8) if math.isfinite(f) and math.isfinite(e) else math.inf
        for f, e in zip(fused, eager)
    ]


def compare_impls(a) -> int:
    """Per method and precision: the losses of loss.impl=fused and loss.impl=eager, step by step."""
    cuda = torch.cuda.is_available()
    env = None if cuda else {"TRITON_INTERPRET": "1"}  # no GPU: the fused kernels run interpreted
    jobs = [(m, prec, impl) for m in a.methods for prec in a.precisions for impl in ("fused", "eager")]

    def go(job):
        m, prec, impl = job
        try:
            recs = _train(
                m,
                a.steps,
                ["train.log_every_steps=1", f"train.precision={prec}", f"loss.impl={impl}", *a.overrides],
                env,
            )
            return job, [r["loss"] for r in recs if "images_per_s" in r], None
        except Exception as e:
            print(f"  {m} {prec} {impl} FAILED: {e}", file=sys.stderr, flush=True)
            return job, None, _first_line(e)

    rows, bad, done = [], 0, {}
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for job, losses, err in ex.map(go, jobs):  # (in order: each method and precision's pair together)
            done[job] = (losses, err)
            m, prec, _ = job
            if (m, prec, "fused") not in done or (m, prec, "eager") not in done:
                continue
            (fl, fe), (el, ee) = done[(m, prec, "fused")], done[(m, prec, "eager")]
            row = {
                "method": m,
                "precision": prec,
                "steps": a.steps,
                "device": "cuda" if cuda else "cpu",
                "loss_fused": fl,
                "loss_eager": el,
                "tolerance": LOSS_TOL.get(prec, 2e-2),
            }
            if fe or ee:
                row["error"] = fe or ee
                bad += 1
            else:
                d = rel_diffs(fl, el)
                row.update(
                    rel_diff=d,
                    rel_diff_step1=d[0] if d else None,
                    max_rel_diff=max(d) if d else None,
                    within_tolerance=bool(d) and len(fl) == len(el) and max(d) <= row["tolerance"],
                )
                bad += not row["within_tolerance"]
            rows.append(row)
            emit(row)
            print(
                f"  losses {m:10s} {prec:5s} "
                + (
                    f"FAILED: {row['error']}"
                    if "error" in row
                    else f"step-1 rel. diff {row['rel_diff_step1']:.2e}, max {row['max_rel_diff']:.2e}"
                ),
                flush=True,
            )
    lines = [
        "| method | precision | steps | loss eager (first -> last) | loss fused (first -> last) | "
        "rel. diff step 1 | max rel. diff | tolerance | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['precision']} | {r['steps']} | - | - | - | - | {r['tolerance']:g} | "
                f"failed: {r['error'].replace('|', '/')} |"
            )
            continue
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['steps']} | {r['loss_eager'][0]:.5f} -> "
            f"{r['loss_eager'][-1]:.5f} | {r['loss_fused'][0]:.5f} -> {r['loss_fused'][-1]:.5f} | "
            f"{r['rel_diff_step1']:.2e} | {r['max_rel_diff']:.2e} | {r['tolerance']:g} | "
            f"{'within' if r['within_tolerance'] else 'ABOVE'} |"
        )
    where = "CUDA GPU (fused = compiled Triton kernels)" if cuda else "CPU (fused = Triton interpreter)"
    table = "\n".join(lines) + (
        f"\n\n`loss.impl=fused` vs `eager`, same seed, one process each, on the {where}; "
        f"each method's built-in config"
        + (f" with `{' '.join(a.overrides)}`" if a.overrides else "")
        + "; relative difference |fused - eager| / |eager| of the logged loss per step."
    )
    ok = [r for r in rows if "error" not in r]
    publish(
        "train_losses",
        rows,
        table,
        a.out,
        [f"{r['method']} {r['precision']}" for r in ok],
        [max(r["max_rel_diff"], 1e-12) for r in ok],
        "max relative loss difference, fused vs eager",
        "fused vs eager training losses",
    )
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="default: the methods declaring 'train_step' ('compare-impls' with --compare-impls)",
    )
    p.add_argument("--steps", type=int, default=None, help="default: 30 (5 with --compare-impls)")
    p.add_argument(
        "--pipelines",
        nargs="+",
        choices=PIPELINES,
        default=None,
        help="default: torch dali-cpu, and dali-gpu when CUDA is present",
    )
    p.add_argument("--compare-impls", action="store_true", help="fused vs eager losses instead of throughput")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    p.add_argument("--jobs", type=int, default=1, help="--compare-impls: training runs at once")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.batch_size=64")
    a = p.parse_args(argv)
    if not a.methods:  # (the registry's methods: imported only when needed)
        from fastssl.methods import for_tools

        a.methods = for_tools("compare-impls" if a.compare_impls else "train_step")
    if a.compare_impls:
        a.steps = a.steps or 5
        return compare_impls(a)
    a.steps = a.steps or 30
    return throughput(a)


if __name__ == "__main__":
    sys.exit(main())
