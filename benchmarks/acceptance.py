"""The GPU acceptance run: what a new GPU machine shows, in one call, keeping every row it measured.

    bash benchmarks/gpu_acceptance.sh [--tiny] [--only SECTION[,SECTION]] [OUT_DIR]
    python -m benchmarks.acceptance   [--tiny] [--only SECTION[,SECTION]] [OUT_DIR]

Sections, in the order of what a 15-minute GPU loan must not miss (each under its own time limit;
time a section leaves unused goes to the next; the run stops by its budget):

  imagenet      the headline: InvP ResNet-50 224 px / SC ResNet-18 96 px from an ImageNet-shaped
                JPEG folder, dali-gpu vs DataLoader vs the synthetic ceiling (benchmarks.imagenet)
  kernels       fused losses vs GEMM form vs eager vs torch.compile at the headline sizes, values
                checked there, the InvP bank scan alone (benchmarks.kernels --sizes headline)
  compiled      every kernel variant a launch compiles, for sm_90 (python -m fastssl.kernels.compiled)
  pipelines     data pipelines per method, DALI GPU / DALI CPU / DataLoader (benchmarks.pipelines)
  train_losses  a few steps of sc and invp, loss.impl=fused vs eager, fp32 and bf16, on the tensor
                pipeline (no DALI needed) (benchmarks.train_step --compare-impls)
  knn           the kNN graph of 1,281,167 x 128 unit vectors: torch on the GPU, FAISS (benchmarks.knn)
  doctor        every component against its reference, quick (python -m fastssl.doctor --quick)

Files in OUT_DIR (default benchmarks/results/gpu-acceptance; at most 6, here 3):

  acceptance.jsonl  one JSON object per line: each row as its section measured it ({"section": ...,
                    row}), then the section's record ({"section": ..., "record": "section", "status",
                    "seconds", "limit_s", "markdown"...}); a section stopped by its limit keeps the
                    rows it finished.  ``python -m benchmarks.readme`` renders it.
  acceptance.log    every command, its output and its exit status.
  summary.md        the rendered report (rewritten after every section).

Limits: LIMITS below, or ``LIMIT_<SECTION>`` in the environment (seconds, e.g. LIMIT_KNN=60).
``--tiny``: CPU-sized (under 4 minutes on 2 cores); sections whose point is the GPU say "not
available: no GPU" and keep what ran on the CPU instead.  ``--only imagenet,kernels``: rerun those
sections on a still-warm machine, appending to the same files.  Exit status 0 when every section
run finished (ok, or not available without a GPU), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "benchmarks", "results", "gpu-acceptance")
FILES = ("acceptance.jsonl", "acceptance.log", "summary.md")
# section -> (limit on a GPU, limit with --tiny) in seconds; the GPU budget is 6 minutes in all
LIMITS = {
    "imagenet": (110, 50),
    "kernels": (70, 30),
    "compiled": (30, 35),
    "pipelines": (40, 30),
    "train_losses": (30, 50),
    "knn": (25, 15),
    "doctor": (40, 35),
}
SECTIONS = tuple(LIMITS)
BUDGET = (360, 235)
GPU_SECTIONS = {"imagenet", "kernels", "pipelines", "train_losses", "knn"}  # their point is the GPU


def commands(name: str, tiny: bool, scratch: str, gpu: bool, faiss_gpu: bool, limit: int):
    """The section's commands (run one after the other, under the section's limit)."""
    py = sys.executable
    if name == "imagenet":
        small = ["--tiny", "--runs", "invp", "--pipelines", "torch", "dali-cpu"]
        return [[py, "-m", "benchmarks.imagenet", "--out", scratch] + (small if tiny else [])]
    if name == "kernels":
        if tiny:
            return [[py, "-m", "benchmarks.kernels", "--tiny", "--b", "64", "--d", "32", "--out", scratch]]
        budget = max(10, limit - 15)
        return [
            [py, "-m", "benchmarks.kernels", "--sizes", "headline", "--repeats", "10"]
            + ["--time-budget", str(budget), "--out", scratch]
        ]
    if name == "compiled":
        small = ["--variants", "aligned", "--precisions", "fp32", "bf16"] if tiny else []
        return [
            [py, "-m", "fastssl.kernels.compiled", "--markdown", "--jsonl", os.path.join(scratch, "rows.jsonl")] + small
        ]
    if name == "pipelines":
        size = ["--sizes", "32", "--images", "256", "--batch", "64", "--repeats", "1", "--workers", "1"]
        full = ["--sizes", "96", "--images", "2048", "--batch", "256", "--repeats", "2"]
        return [
            [
                py,
                "-m",
                "benchmarks.pipelines",
                *(["--method", "sc", "invp"] if tiny else []),  # (full: the methods declaring "pipelines")
                *(size if tiny else full),
                "--out",
                scratch,
            ]
        ]
    if name == "train_losses":
        tiny_cfg = ["data.builtin.num_train=256", "data.builtin.num_test=64", "data.batch_size=16", "model.width=16"]
        return [
            [
                py,
                "-m",
                "benchmarks.train_step",
                "--compare-impls",  # (the methods declaring "compare-impls": sc invp)
                "--precisions",
                "fp32",
                "bf16",
                "--steps",
                "2" if tiny else "5",
                "--jobs",
                "2" if tiny else "4",
                "--out",
                scratch,
                "data.pipeline=tensor",
                "data.num_workers=1",
                *(tiny_cfg if tiny else []),
            ]
        ]
    if name == "knn":
        if tiny:
            return [
                [
                    py,
                    "-m",
                    "benchmarks.knn",
                    "--n",
                    "2000",
                    "--repeats",
                    "1",
                    "--impls",
                    "torch",
                    "faiss-flat",
                    "--out",
                    scratch,
                ]
            ]
        impls = ["torch", "faiss-flat"] if faiss_gpu else ["torch"]
        return [
            [
                py,
                "-m",
                "benchmarks.knn",
                "--n",
                "1281167",
                "--d",
                "128",
                "--k",
                "5",
                "--impls",
                *impls,
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--out",
                scratch,
            ]
        ]
    if name == "doctor":
        return [
            [
                py,
                "-m",
                "fastssl.doctor",
                "--quick",
                "--jobs",
                "2" if tiny else "4",
                "--json",
                os.path.join(scratch, "doctor.json"),
            ]
        ]
    raise ValueError(name)


def machine():
    import torch

    from benchmarks.common import device_name

    try:
        import faiss

        fg = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") and torch.cuda.is_available() else 0
    except Exception:
        fg = 0
    return torch.cuda.is_available(), fg > 0, device_name()


class Run:
    def __init__(self, out: str, tiny: bool, append: bool):
        os.makedirs(out, exist_ok=True)
        self.out, self.tiny = out, tiny
        self.rows = os.path.join(out, "acceptance.jsonl")
        self.log_path = os.path.join(out, "acceptance.log")
        if not append:
            for f in FILES:
                if os.path.exists(os.path.join(out, f)):
                    os.remove(os.path.join(out, f))
        self.gpu, self.faiss_gpu, self.device = machine()
        self.start, self.saved = time.monotonic(), 0
        self.budget = BUDGET[1 if tiny else 0]

    def log(self, text: str, echo: bool = True) -> None:
        with open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")
        if echo:
            print(text.rstrip("\n"), flush=True)

    def record(self, obj: dict) -> None:
        with open(self.rows, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    def section(self, name: str) -> bool:
        limit = int(os.environ.get(f"LIMIT_{name.upper()}", LIMITS[name][1 if self.tiny else 0]))
        left = self.budget - (time.monotonic() - self.start)
        t = int(min(limit + self.saved, left))
        rec = {"section": name, "record": "section", "device": self.device, "tiny": self.tiny, "limit_s": t}
        if t < 5:
            rec.update(status="not run", why=f"the {self.budget} s budget is spent", seconds=0)
            self.record(rec)
            self.log(f"== {name}: not run (the {self.budget} s budget is spent)")
            return False
        scratch = tempfile.mkdtemp(prefix=f"fastssl-acceptance-{name}-")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        env.update(FASTSSL_BENCH_ROWS=self.rows, FASTSSL_BENCH_SECTION=name)
        if name == "compiled":
            env.pop("TRITON_INTERPRET", None)
        t0, rc, out, err = time.monotonic(), 0, "", ""
        for cmd in commands(name, self.tiny, scratch, self.gpu, self.faiss_gpu, t):
            remaining = t - (time.monotonic() - t0)
            self.log(f"== {name} (limit {t} s): {shlex.join(cmd)}")
            rc, o, e = run_limited(cmd, env, remaining)
            out, err = out + o, err + e
            if rc != 0:
                break
        took = round(time.monotonic() - t0, 1)
        self.saved = max(0, int(t - took))
        self.log(f"-- {name}: exit {rc} after {took} s\n-- stdout:\n{out}\n-- stderr:\n{err}", echo=False)
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        if rc == 0:
            status, why = "ok", ""
        elif rc in (124, -signal.SIGKILL, -signal.SIGTERM):
            status, why = "timed out", f"stopped by its {t} s limit (the rows it finished are kept)"
        else:
            status, why = "failed", f"exit {rc}" + (f": {lines[-1][:200]}" if lines else "")
        rec.update(status=status, why=why, seconds=took, exit_code=rc, command=shlex.join(cmd))
        if status != "ok":
            rec["stderr_tail"] = "\n".join(err.rstrip().splitlines()[-25:])
        if name in GPU_SECTIONS and not self.gpu:
            rec.update(status="not available", why="no GPU", cpu_status=status, cpu_why=why)
        rec["markdown"] = markdown(name, scratch, out)
        self.after(name, scratch)
        self.record(rec)
        good = rec["status"] == "ok" or (rec["status"] == "not available" and rec.get("cpu_status") == "ok")
        self.log(
            f"   {name:13s} {rec['status']}{': ' + rec['why'] if rec['why'] else ''}"
            + (f" (on the CPU instead: {status}{': ' + why if why else ''})" if "cpu_status" in rec else "")
            + f"  [{took} s of {t} s]"
        )
        self.summary()
        return good

    def after(self, name: str, scratch: str) -> None:
        """Rows a section writes to a file of its own rather than through benchmarks.common.emit."""
        if name == "compiled":
            path = os.path.join(scratch, "rows.jsonl")
            for line in open(path) if os.path.isfile(path) else []:
                self.record({"section": name, **json.loads(line)})
        if name == "doctor":
            path = os.path.join(scratch, "doctor.json")
            if os.path.isfile(path):
                doc = json.load(open(path))
                for comp in doc.get("components", []):
                    self.record({"section": name, **comp})
                self.record(
                    {
                        "section": name,
                        "record": "versions",
                        "versions": doc.get("versions", {}),
                        "verdict": doc.get("verdict", ""),
                    }
                )

    def summary(self) -> None:
        from benchmarks.readme import acceptance_section

        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write((acceptance_section(self.out) or "") + "\n")


def run_limited(cmd, env, limit: float):
    """``cmd`` under a wall-clock limit: (exit status, stdout, stderr); killed with its whole
    process group when the limit passes (status -SIGKILL)."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=max(1.0, limit))
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return -signal.SIGKILL, out, err


def markdown(name: str, scratch: str, stdout: str) -> str:
    """The section's own table where its suite wrote one (a finished section)."""
    if name == "compiled":
        start = stdout.find("| kernel |")
        return stdout[start:].strip() if start >= 0 else ""
    parts = []
    for f in sorted(os.listdir(scratch)) if os.path.isdir(scratch) else []:
        if f.endswith(".md"):
            text = open(os.path.join(scratch, f)).read().strip()
            text = text.split("\n", 1)[1].strip() if text.startswith("# ") else text
            parts.append(
                (f"##### {f[:-3]}\n\n" if len([x for x in os.listdir(scratch) if x.endswith(".md")]) > 1 else "") + text
            )
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_acceptance.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", nargs="?", default=OUT)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", default=None, help="sections to (re)run, e.g. imagenet,kernels (appends to OUT_DIR)")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    run = Run(os.path.abspath(a.out), a.tiny, append=a.only is not None)
    run.log(
        f"fastssl GPU acceptance: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, device {run.device}, "
        f"cuda {int(run.gpu)}, faiss GPU {int(run.faiss_gpu)}, tiny {int(a.tiny)}, python {sys.executable}, "
        f"budget {run.budget} s, sections {','.join(only)}"
    )
    good = [run.section(name) for name in only]
    run.log(
        f"== done in {time.monotonic() - run.start:.0f} s of {run.budget} s; files in {run.out}: "
        + " ".join(sorted(os.listdir(run.out)))
    )
    return 0 if all(good) else 1


if __name__ == "__main__":
    sys.exit(main())
