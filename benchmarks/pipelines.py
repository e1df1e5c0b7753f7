"""Data-pipeline throughput of each method's recipe: DALI GPU, DALI CPU, the tensor executor
(dataset resident on the training device) and the torchvision DataLoader baseline.

    python -m benchmarks.pipelines [--method NAME ...] [--sizes 32 96] [--images 4096]

``--method`` defaults to the methods that declare "pipelines" in their ``benchmarks``
(fastssl.methods.for_tools: sc layerwise invp splitbrain).

Each executor runs the same plan over the same in-memory uint8 images for whole epochs; the
rate is images/s (median, min, max over repeats after a warm-up epoch) with the batch on the
training device, and each is reported as a ratio to the DataLoader measured in the same run.
DALI GPU is skipped with a message where no GPU is present.  Results: benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, publish, summary, timed  # noqa: E402
from fastssl.config import load_config  # noqa: E402
from fastssl.data.executors.dali import DaliExecutor  # noqa: E402
from fastssl.data.executors.dataloader import TorchExecutor  # noqa: E402
from fastssl.data.executors.tensor import TensorExecutor  # noqa: E402
from fastssl.data.sources import Split, make_builtin  # noqa: E402
from fastssl.methods import for_tools, get_method  # noqa: E402
from fastssl.models import build_backbone  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_epoch(loader, device):
    n = 0
    for b in loader:
        for v in b["views"]:
            v.to(device, non_blocking=True)
        n += len(b["index"])
    return n


def epochs_of(loader, device):
    """A callable running the loader's next epoch."""
    epoch = [0]

    def one_epoch():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        return run_epoch(loader, device)

    return one_epoch


def bench(method: str, size: int, images: int, batch: int, workers: int, repeats: int):
    cfg = load_config(
        os.path.join(ROOT, "configs", method, "builtin.yaml"),
        [f"data.builtin.image_size={size}", f"data.batch_size={batch}"],
    )
    x, _ = make_builtin(images, size, 10, seed=0)
    m = get_method(method)(cfg, build_backbone(cfg.model, size), size)
    common = dict(
        split=Split(images=x),
        recipe=m.recipe(),
        batch_size=batch,
        seed=0,
        rank=0,
        world=1,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    executors = {
        "torch-dataloader": lambda: TorchExecutor(
            **common, base_size=size, num_workers=workers, pin_memory=device.type == "cuda"
        ),
        "dali-cpu": lambda: DaliExecutor(**common, device="cpu", base_size=size, num_threads=max(1, workers)),
        "tensor": lambda: TensorExecutor(**common, device=device),
    }
    if torch.cuda.is_available():
        executors["dali-gpu"] = lambda: DaliExecutor(
            **common, device="gpu", base_size=size, num_threads=max(1, workers), device_id=0
        )
    else:
        print("  dali-gpu: skipped (no CUDA GPU on this machine)")
    rows = []
    for name, make in executors.items():
        row = {"method": method, "image_size": size, "executor": name, "workers": workers, "batch": batch}
        try:
            loader = make()
            row["images_per_s"] = summary(timed(epochs_of(loader, device), repeats), len(loader) * batch)
            del loader  # free the DALI pipeline before the next executor starts
            print(f"  {method} {size}px {name:17s} {row['images_per_s']['median']:10.0f} images/s", flush=True)
        except Exception as e:  # e.g. DALI that cannot load: an error row, the other executors still run
            row["error"] = f"{type(e).__name__}: {next((ln for ln in str(e).splitlines() if ln.strip()), '')}"[:200]
            print(f"  {method} {size}px {name:17s} FAILED: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
        emit(row)
        gc.collect()
    base = next((r for r in rows if r["executor"] == "torch-dataloader" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["ratio_vs_torch"] = r["images_per_s"]["median"] / base["images_per_s"]["median"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=None, help="default: the methods declaring 'pipelines'")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    a = p.parse_args(argv)
    for method in a.method or for_tools("pipelines"):
        rows = []
        for s in a.sizes:
            rows += bench(method, s, a.images, a.batch, a.workers, a.repeats)
        lines = [
            "| method | image | executor | images/s (median) | min | max | vs torch DataLoader |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['image_size']}px | {r['executor']} | failed: {r['error']} | | | |")
                continue
            ips = r["images_per_s"]
            ratio = f"{r['ratio_vs_torch']:.2f}x" if "ratio_vs_torch" in r else "-"
            lines.append(
                f"| {r['method']} | {r['image_size']}px | {r['executor']} | {ips['median']:.0f} | "
                f"{ips['min']:.0f} | {ips['max']:.0f} | {ratio} |"
            )
        table = (
            "\n".join(lines)
            + f"\n\n{a.images} images, batch {a.batch}, {a.workers} workers/threads, {a.repeats} repeats."
        )
        ok = [r for r in rows if "ratio_vs_torch" in r]
        publish(
            f"pipelines-{method}",
            rows,
            table,
            a.out,
            [f"{r['image_size']}px {r['executor']}" for r in ok],
            [r["ratio_vs_torch"] for r in ok],
            "images/s vs torchvision DataLoader",
            f"{method} data pipeline",
        )


if __name__ == "__main__":
    main()
