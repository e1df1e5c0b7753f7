"""RGB -> Lab conversion + Split-Brain target quantisation: DALI GPU vs DALI CPU vs scikit-image.

    python -m benchmarks.lab [--size 96] [--images 4096] [--batch 256] [--workers N] [--repeats 3]

All three compute the same thing for every image (Lab, the normalised network input, and the
two quantised 12x12 target grids; tests/test_splitbrain.py checks DALI against this file's
scikit-image/NumPy reference bin for bin): the DALI graph of fastssl/data/lab.py on the GPU
and on DALI's CPU backend (``workers`` threads), and ``skimage.color.rgb2lab`` + NumPy run by a
torch DataLoader with ``workers`` processes (the baseline).  Rates are images/s (median of
repeats after a warm-up pass) and ratios to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import publish, summary, timed  # noqa: E402
from fastssl.data.lab import ColorSplit  # noqa: E402
from fastssl.data.sources import make_builtin  # noqa: E402


def reference_colour(im: np.ndarray, split: ColorSplit) -> np.ndarray:
    """scikit-image: HWC float64 in the space's units (Lab, or RGB 0..255)."""
    from skimage.color import rgb2lab

    return rgb2lab(im) if split.space == "lab" else im.astype(np.float64)


def reference_bins(im: np.ndarray, split: ColorSplit, c: np.ndarray | None = None):
    """NumPy: per-channel bins (s, s, 3) of the block-mean colours, and the unfloored bin
    coordinates (to tell values that sit on a bin edge); ``c`` = the image's colour when known."""
    c = reference_colour(im, split) if c is None else c
    if split.rescale:
        lo, hi = c.min((0, 1)), c.max((0, 1)) + 1e-6
    else:
        lo, hi = split.fixed_range()
    f, s = split.factor, im.shape[0] // split.factor
    small = c.reshape(s, f, s, f, 3).mean((1, 3))
    n = np.array([split.bins1, split.bins2, split.bins2])
    u = (small - lo) / (hi - lo) * n
    return np.clip(np.floor(u), 0, n - 1).astype(np.int64), u


def reference_targets(im: np.ndarray, split: ColorSplit):
    """The baseline's outputs for one HWC uint8 image: (input CHW, targets 1, targets 2)."""
    c = reference_colour(im, split)  # converted once, for the input and the targets
    centre, half = split.input_scale()
    inp = ((c - centre) / half).astype(np.float32).transpose(2, 0, 1)
    q, _ = reference_bins(im, split, c)
    return inp, q[..., 0], q[..., 1] * split.bins2 + q[..., 2]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images, batch, split):
        self.images, self.batch, self.split = images, batch, split

    def __len__(self):
        return len(self.images) // self.batch

    def __getitem__(self, k):
        outs = [reference_targets(im, self.split) for im in self.images[k * self.batch : (k + 1) * self.batch]]
        return [torch.from_numpy(np.stack(o)) for o in zip(*outs)]


def dali_runner(images, batch, split, device, threads):
    from nvidia.dali import fn, pipeline_def

    side = images.shape[1]
    batches = [list(images[k * batch : (k + 1) * batch]) for k in range(len(images) // batch)]
    state = {"k": 0}

    def source():
        b = batches[state["k"] % len(batches)]
        state["k"] += 1
        return b

    @pipeline_def(
        batch_size=batch, num_threads=threads, device_id=0 if device == "gpu" else None, prefetch_queue_depth=2
    )
    def pipe():
        x = fn.external_source(source=source, batch=True)
        return tuple(split.dali(x.gpu() if device == "gpu" else x, side))

    p = pipe()
    p.build()

    def epoch():
        for _ in range(len(batches)):
            outs = p.run()
            if device == "gpu":
                outs[0].as_cpu()  # wait for the GPU work of this batch

    return epoch


def run(size, n, batch, workers, repeats, rescale):
    images, _ = make_builtin(n, size, 10, seed=0)
    images = np.ascontiguousarray(images)
    split = ColorSplit(space="lab", rescale=rescale, factor=8)
    baseline = torch.utils.data.DataLoader(_Batches(images, batch, split), batch_size=None, num_workers=workers)
    runners = {
        f"scikit-image + numpy ({workers} procs)": lambda: [None for _ in baseline],
        f"dali-cpu ({workers} threads)": dali_runner(images, batch, split, "cpu", workers),
    }
    if torch.cuda.is_available():
        runners["dali-gpu"] = dali_runner(images, batch, split, "gpu", workers)
    else:
        print("  dali-gpu: skipped (no CUDA GPU on this machine)")
    done = (len(images) // batch) * batch
    rows = []
    for name, fn in runners.items():
        rows.append(
            {
                "impl": name,
                "image_size": size,
                "images": done,
                "batch": batch,
                "rescale": rescale,
                "images_per_s": summary(timed(fn, repeats), done),
            }
        )
        print(f"  lab {size}px {name:32s} {rows[-1]['images_per_s']['median']:10.0f} images/s", flush=True)
    base = rows[0]["images_per_s"]["median"]
    for r in rows:
        r["ratio_vs_skimage"] = r["images_per_s"]["median"] / base
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for rescale in (False, True):
        rows += run(a.size, a.images, a.batch, a.workers, a.repeats, rescale)
    lines = ["| implementation | Lab | images/s (median) | min | max | vs scikit-image |", "|---|---|---|---|---|---|"]
    for r in rows:
        ips = r["images_per_s"]
        lines.append(
            f"| {r['impl']} | {'re-scaled' if r['rescale'] else 'plain'} | {ips['median']:.0f} | "
            f"{ips['min']:.0f} | {ips['max']:.0f} | {r['ratio_vs_skimage']:.2f}x |"
        )
    table = "\n".join(lines) + (
        f"\n\n{a.size}x{a.size} images -> Lab input + 100-bin L and 10x10-bin ab targets on a "
        f"{a.size // 8}x{a.size // 8} grid; {rows[0]['images']} images, batch {a.batch}, "
        f"{a.repeats} repeats."
    )
    publish(
        "lab",
        rows,
        table,
        a.out,
        [f"{r['impl']} {'re-scaled' if r['rescale'] else 'plain'}" for r in rows],
        [r["ratio_vs_skimage"] for r in rows],
        "images/s vs scikit-image + numpy",
        "Lab conversion + quantisation",
    )


if __name__ == "__main__":
    main()
