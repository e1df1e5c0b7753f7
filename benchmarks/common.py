"""Shared benchmark helpers: device naming, repeated timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def missing(module: str) -> str | None:
    """Why ``module`` (nvidia.dali, faiss) cannot be used here, or None when it imports: a core
    install (no cpu/cu12/cu13 extra) has neither, and the suites that measure them say so and skip."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} is not installed ({type(e).__name__}; fastssl's [cpu], [cu12] or [cu13] extra brings it)"
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{os.cpu_count()}cores"


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    for mod in ("nvidia.dali", "faiss", "triton"):
        try:
            env[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def timed(fn, repeats: int, warmup: int = 1):
    """Run ``fn`` warmup + repeats times; returns the repeat timings in seconds."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def summary(times, items: int) -> dict:
    rates = [items / t for t in times]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": len(times)}


ROWS_ENV, SECTION_ENV, STALL_ENV = "FASTSSL_BENCH_ROWS", "FASTSSL_BENCH_SECTION", "FASTSSL_BENCH_STALL_AFTER"
_EMITTED = [0]


def emit(row: dict) -> None:
    """Append one measured row, at once, to the JSON-lines file ``$FASTSSL_BENCH_ROWS`` (the GPU
    acceptance run's ``acceptance.jsonl``), tagged with ``$FASTSSL_BENCH_SECTION``; nothing without
    it.  A suite calls it as each row is measured, so a suite stopped by its time limit has given
    every row it finished.  (``$FASTSSL_BENCH_STALL_AFTER=N``: hang after the N-th row, as a
    stuck measurement would: the test of that guarantee.)"""
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"section": os.environ.get(SECTION_ENV, ""), **row}, default=str) + "\n")
    _EMITTED[0] += 1
    stall = os.environ.get(STALL_ENV)
    if stall and _EMITTED[0] >= int(stall):
        time.sleep(10**6)


def write_results(suite: str, rows: list, table_md: str, out_dir: str | None = None) -> str:
    out_dir = out_dir or os.path.join(RESULTS, device_name())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{suite}.json"), "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, f"{suite}.md"), "w") as f:
        f.write(f"# {suite} on {device_name()}\n\n{table_md}\n")
    return out_dir


def publish(suite: str, rows: list, table_md: str, out_dir, labels, ratios, xlabel: str, title: str) -> str:
    """Print a suite's table, write its JSON/markdown and its bar chart of ratios; returns the folder."""
    print(table_md)
    out = write_results(suite, rows, table_md, out_dir)
    bar_plot(labels, ratios, xlabel, title, os.path.join(out, f"{suite}.png"))
    print("written to", out)
    return out


def bar_plot(labels, values, xlabel: str, title: str, path: str) -> None:
    """A horizontal bar chart (ratios against a suite's baseline), labelled with the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlabel=xlabel, title=f"{title} ({device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
