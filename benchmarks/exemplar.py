"""Exemplar-CNN surrogate-patch generation: DALI GPU vs DALI CPU vs the tensor executor vs a torch
DataLoader baseline, and reading a materialised set.

    python -m benchmarks.exemplar [--size 96] [--images 2048] [--per-class 16] [--batch 512] [--workers N]

Every executor makes the same 32x32 patches from the surrogate recipe (fastssl/methods/exemplar/ops.py:
warp_affine + PCA colour matrix + exact HSV round trip, on the GPU or on DALI's CPU backend
with ``workers`` threads; the torch faces, grid_sample + einsum + the same HSV maths, in a
DataLoader with ``workers`` processes, or on the images resident on the training device;
tests/test_exemplar.py checks DALI and torch agree to one grey level).  One seed image per class, ``per-class`` patches of each: one epoch of the surrogate
set per repeat.  "materialised" reads the same epoch back from a ``patches.npy`` memory map
(page cache warm), i.e. the cost of training from a set generated once.  Rates are patches/s
(median of repeats after a warm-up pass); ratios are to the DataLoader measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import publish, summary, timed  # noqa: E402
from fastssl.data.decode import to_chw  # noqa: E402
from fastssl.data.executors.dali import DaliExecutor  # noqa: E402
from fastssl.data.executors.dataloader import TorchExecutor  # noqa: E402
from fastssl.data.executors.tensor import TensorExecutor  # noqa: E402
from fastssl.data.sources import Split, make_builtin  # noqa: E402
from fastssl.methods.exemplar import surrogate as ex  # noqa: E402
from fastssl.methods.exemplar.materialised import FileSurrogateLoader, materialise  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96, help="seed image side (STL-10: 96)")
    p.add_argument("--images", type=int, default=2048, help="seed images = surrogate classes")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    images, _ = make_builtin(a.images, a.size, 10, seed=0)
    split = Split(images=np.ascontiguousarray(images))
    n = a.images
    sset = ex.make_surrogate_set(split, a.size, np.arange(n), np.arange(n), n, seed=0)
    pca = ex.pca_basis(to_chw(images[:1000]))
    aug = ex.SurrogateAug()
    recipe = ex.surrogate_recipe(sset, aug, 32, a.size, pca, a.per_class)
    common = dict(
        split=split, recipe=recipe, batch_size=a.batch, seed=0, rank=0, world=1, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = {
        f"torch-dataloader ({a.workers} procs)": TorchExecutor(**common, base_size=a.size, num_workers=a.workers),
        f"dali-cpu ({a.workers} threads)": DaliExecutor(
            **common, device="cpu", base_size=a.size, num_threads=a.workers
        ),
        f"tensor ({device})": TensorExecutor(**common, device=device),
    }
    if torch.cuda.is_available():
        loaders["dali-gpu"] = DaliExecutor(**common, device="gpu", base_size=a.size, num_threads=a.workers, device_id=0)
    else:
        print("  dali-gpu: skipped (no CUDA GPU on this machine)")
    epoch_no = {"k": 0}

    def epoch(loader):
        def go():
            loader.set_epoch(epoch_no["k"])  # the DALI loaders run whole epochs in order
            epoch_no["k"] += 1
            for b in loader:
                b["views"][0].cpu()  # (waits for GPU work)

        return go

    patches = len(next(iter(loaders.values()))) * a.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, loader in loaders.items():
            epoch_no["k"] = 0
            rows.append(
                {
                    "executor": name,
                    "patches": patches,
                    "batch": a.batch,
                    "image_size": a.size,
                    "patches_per_s": summary(timed(epoch(loader), a.repeats), patches),
                }
            )
            print(f"  exemplar {name:32s} {rows[-1]['patches_per_s']['median']:10.0f} patches/s", flush=True)
        materialise(
            DaliExecutor(**common, device="cpu", base_size=a.size, num_threads=a.workers),
            tmp,
            sset,
            pca,
            progress=False,
        )
        fl = FileSurrogateLoader(tmp, a.batch, 0, 0, 1)
        rows.append(
            {
                "executor": "materialised (patches.npy)",
                "patches": patches,
                "batch": a.batch,
                "image_size": a.size,
                "patches_per_s": summary(timed(epoch(fl), a.repeats), patches),
            }
        )
        print(f"  exemplar {'materialised':32s} {rows[-1]['patches_per_s']['median']:10.0f} patches/s", flush=True)
    base = rows[0]["patches_per_s"]["median"]
    for r in rows:
        r["ratio_vs_dataloader"] = r["patches_per_s"]["median"] / base
    full = 16000 * 100
    lines = [
        "| executor | patches/s (median) | min | max | vs DataLoader | 16,000 x 100 set |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["patches_per_s"]
        lines.append(
            f"| {r['executor']} | {s['median']:.0f} | {s['min']:.0f} | {s['max']:.0f} | "
            f"{r['ratio_vs_dataloader']:.2f}x | {full / s['median']:.0f} s |"
        )
    table = "\n".join(lines) + (
        f"\n\n{a.images} seed images of {a.size} px x {a.per_class} patches of 32x32 "
        f"(all six transformation families), batch {a.batch}, {a.repeats} repeats; the last "
        f"column extrapolates the rate to the paper's 1.6M-patch set."
    )
    publish(
        "exemplar",
        rows,
        table,
        a.out,
        [r["executor"] for r in rows],
        [r["ratio_vs_dataloader"] for r in rows],
        "patches/s vs torch DataLoader",
        "Exemplar-CNN surrogate patches",
    )


if __name__ == "__main__":
    main()
