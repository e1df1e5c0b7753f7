"""The headline: pre-training throughput from a folder of JPEG files, ImageNet-shaped.

    python -m benchmarks.imagenet [--images 10000] [--steps 40] [--root DIR] [--out DIR] [--tiny]

Writes an ImageNet-shaped JPEG folder on this machine (``benchmarks.folder.make_folder`` with
``shape="imagenet"``: mostly 4:3 landscape, about 400 x 350 px, quality 90, crops of scikit-image's
photographs; generated once, then reused) and trains on it with ``fastssl/train.py``, one process:

* InvP, ResNet-50, 224 px (``configs/invp/imagenet-folder.yaml``; bf16 and channels_last on a GPU,
  the defaults there);
* SC, ResNet-18, 96 px (``configs/sc/stl10.yaml`` on the folder: STL-10's image size);

each with ``dali-gpu`` (nvJPEG, the hardware decoder where the GPU has one; GPU only), the
torchvision ``DataLoader`` on every CPU core (``torch``), ``dali-cpu`` (CPU machines), and
``synthetic`` (the first batch kept on the device and served every step: the step without data,
the ceiling).  Per row: images/s and data-stall (medians over logging windows after the first,
from the run's own metrics.jsonl), peak GPU memory, and the ratio to the ceiling.  Goal on one
H200: InvP from the folder at >= 6,000 images/s with data-stall <= 5% (anchors: MLPerf Training
v4.0's ResNet-50 with DALI, about 7,900 images/s per H200; NVIDIA's PyTorch ResNet-50 with DALI,
2,470 images/s per A100).  Rows are appended to ``imagenet.jsonl`` as they are measured (a run
cut short keeps them), then imagenet.{json,md} are written.

``--tiny``: 48 images, 32 px, batch 8, a ResNet-18 of width 8, 3 steps (a CPU machine, CI):
says that the script works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import device_name, emit, write_results  # noqa: E402
from benchmarks.folder import make_folder  # noqa: E402
from benchmarks.train_step import TrainFailed, _train  # noqa: E402

CUDA = torch.cuda.is_available()
GOAL = {"images_per_s": 6000, "data_stall": 0.05}  # InvP, ResNet-50, 224 px, one H200, dali-gpu
RUNS = {
    # name: config, its size at full scale, at --tiny (goal: the headline's, on dali-gpu at full scale)
    "invp": dict(
        config="configs/invp/imagenet-folder.yaml",
        label="InvP ResNet-50 224 px",
        goal=GOAL,
        full=["data.image_size=224", "data.batch_size=256"],
        tiny=["data.image_size=32", "data.batch_size=8", "model.arch=resnet18", "model.width=8"]
        + ["method.graph_k=2", "method.background=16"],
    ),
    "sc": dict(
        config="configs/sc/stl10.yaml",
        label="SC ResNet-18 96 px",
        full=["data.image_size=96", "data.batch_size=256"],
        tiny=["data.image_size=32", "data.batch_size=8", "model.width=8"],
    ),
}


def pipelines(tiny: bool):
    return ["dali-gpu", "torch", "synthetic"] if CUDA else ["torch", "dali-cpu"] + (["synthetic"] if tiny else [])


def train(run, pipeline, root, steps, tiny, workers):
    """One training run on the folder (benchmarks.train_step's runner): its logging records."""
    spec = RUNS[run]
    overrides = [
        "data.source=folder",
        f"data.path={root}",
        f"data.pipeline={pipeline}",
        f"data.num_workers={workers}",
        f"train.log_every_steps={max(1, steps // 8)}",
        "train.monitor_every=0",
        *(spec["tiny"] if tiny else spec["full"]),
    ]
    cache = {
        "FASTSSL_CACHE": os.environ.get("FASTSSL_CACHE", os.path.join(tempfile.gettempdir(), "fastssl-bench-cache"))
    }
    try:
        return _train(run, steps, overrides, cache, config=spec["config"])
    except TrainFailed as e:  # (the row says the training process's last line)
        raise RuntimeError(str(e).strip().splitlines()[-1][:300]) from None


def measure(run, pipeline, root, steps, tiny, workers):
    t0 = time.perf_counter()
    recs = [r for r in train(run, pipeline, root, steps, tiny, workers) if "images_per_s" in r]
    after = recs[1:] or recs  # the first window holds start-up (cuDNN's benchmark, DALI's first batches)
    row = {
        "run": run,
        "label": RUNS[run]["label"] + (" (tiny: ResNet-18 of width 8, 32 px)" if tiny else ""),
        "pipeline": pipeline,
        "steps": steps,
        "images_per_s": statistics.median(r["images_per_s"] for r in after),
        "data_stall": statistics.median(r["data_stall"] for r in after),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    peaks = [r["gpu_mem_peak_gib"] for r in recs if "gpu_mem_peak_gib" in r]
    if peaks:
        row["gpu_mem_peak_gib"] = max(peaks)
    return row


def render(rows, tiny: bool) -> str:
    lines = [
        "| run | pipeline | images/s | data-stall | vs synthetic (ceiling) | peak GPU GiB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['pipeline']} | - | - | - | - | failed: {r['error'].replace('|', '/')} |")
            continue
        ceil = next(
            (c for c in rows if c["run"] == r["run"] and c["pipeline"] == "synthetic" and "error" not in c), None
        )
        ratio = f"{r['images_per_s'] / ceil['images_per_s']:.2f}" if ceil and r is not ceil else "-"
        note = ""
        if CUDA and not tiny and "goal" in RUNS[r["run"]] and r["pipeline"] == "dali-gpu":
            met = r["images_per_s"] >= GOAL["images_per_s"] and r["data_stall"] <= GOAL["data_stall"]
            note = f"goal >= {GOAL['images_per_s']:,} images/s, stall <= 5%: {'met' if met else 'NOT met'}"
        mem = f"{r['gpu_mem_peak_gib']:.1f}" if "gpu_mem_peak_gib" in r else "-"
        lines.append(
            f"| {r['label']} | {r['pipeline']} | {r['images_per_s']:.0f} | {r['data_stall']:.1%} | {ratio} | {mem} | "
            f"{note} |"
        )
    where = (
        "tiny sizes on a CPU: the script works; the figures say nothing about a GPU"
        if tiny and not CUDA
        else f"one process on {device_name()}"
    )
    return (
        "\n".join(lines) + f"\n\nImageNet-shaped JPEG folder, {where}; medians over logging windows after the first.\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--images", type=int, default=None, help="default 10,000 (48 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 40 (3 with --tiny)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--pipelines", nargs="+", default=None, help="default: dali-gpu torch synthetic on a GPU")
    p.add_argument("--root", default=None, help="where the JPEG folder is made (default: under the temp dir)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    images = a.images or (48 if a.tiny else 10000)
    steps = a.steps or (3 if a.tiny else 40)
    root = a.root or os.path.join(tempfile.gettempdir(), "fastssl-bench-imagenet", f"n{images}")
    t = time.perf_counter()
    make_folder(root, images, shape="imagenet", progress=not a.tiny)
    print(f"imagenet: {images} JPEGs in {root} ({time.perf_counter() - t:.1f} s)", flush=True)
    workers = 1 if a.tiny else max(1, (os.cpu_count() or 2) - 1)
    out = a.out or os.path.join(ROOT, "benchmarks", "results", device_name())
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "imagenet.jsonl")
    open(log, "w").close()
    rows, failed = [], 0
    for run in a.runs:
        for pipe in a.pipelines or pipelines(a.tiny):
            try:
                row = measure(run, pipe, root, steps, a.tiny, workers)
                print(
                    f"  {row['label']:24s} {pipe:9s} {row['images_per_s']:8.0f} images/s  "
                    f"data-stall {row['data_stall']:.1%}",
                    flush=True,
                )
            except Exception as e:  # a failing run is an error row; the others still run
                failed += 1
                row = {"run": run, "label": RUNS[run]["label"], "pipeline": pipe, "error": str(e)}
                print(f"  {RUNS[run]['label']:24s} {pipe:9s} FAILED: {e}", file=sys.stderr, flush=True)
            rows.append(row)
            emit(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    table = render(rows, a.tiny)
    print(table)
    write_results("imagenet", rows, table, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
