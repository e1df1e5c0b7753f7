"""Image-folder throughput: JPEG files decoded and augmented by DALI CPU, DALI GPU and the
torchvision DataLoader baseline (PIL decoding), and the cost of the folder data check.

    python -m benchmarks.folder [--images 2000] [--size 224] [--batch 128] [--methods invp sc]
                                [--workers N] [--repeats 3] [--root DIR] [--out DIR] [--tiny]

The folder is generated once (``make_folder``: an ImageFolder tree ``root/train/<class>/*.jpg``
of JPEGs 300-500 px a side, crops/rescales/flips of scikit-image's bundled photographs, JPEG
quality 90, deterministic from the seed) and reused by later runs (default root: a cache folder
under the system temp dir).  Each pipeline is built the way training builds it (load_config with
data.source=folder and data.pipeline=..., build_source, the method, begin_stage(0), method.loader)
and timed over whole epochs after a warm-up epoch: images/s (median, min, max over repeats) and
the ratio to the DataLoader measured in the same run.  DALI GPU is skipped with a message where
no GPU is present; where the config has ``data.reader_workers`` a DALI CPU row with
reader_workers=0 (file bytes read on the main thread) is added.  The data check is
``build_source`` (every image decoded once, verdicts cached under $FASTSSL_CACHE) timed in a fresh
process with an empty cache and again with the cache filled, alone and as training starts
(``load_config`` + ``build_source``).  Results: benchmarks/results/<device>/folder.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import missing, publish, summary, timed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = ".make_folder.json"  # a dot-file: neither the sources nor the data check list it
# scikit-image's bundled photographs (in the wheel, no download); grey ones become RGB
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
)
SIDE = (300, 500)  # each side of a generated image, drawn uniformly (inclusive)
QUALITY = 90
PIPELINES = ("torch", "dali-cpu", "dali-gpu")
LABELS = {"torch": "torch DataLoader (PIL)", "dali-cpu": "dali-cpu", "dali-gpu": "dali-gpu"}


# --------------------------------------------------------------------------- the folder


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def _paths(root: str, n: int, classes: int):
    return [os.path.join(root, "train", f"class{i % classes:02d}", f"{i:06d}.jpg") for i in range(n)]


# ImageNet-like shapes (``shape="imagenet"``): mostly landscape 4:3, mean about 400 x 350 px
# (ILSVRC-2012 train: mean 400 x 350, most images 500 x 375 or 375 x 500 and smaller)
ASPECTS = ((4 / 3, 0.6), (1.0, 0.12), (3 / 4, 0.16), (3 / 2, 0.12))  # (width / height, share)
HEIGHT = (280, 420)


def _shape(rng, shape: str):
    """(height, width) of the next image: ``square``-ish (each side uniform in SIDE) or
    ``imagenet`` (a height in HEIGHT and an aspect drawn from ASPECTS)."""
    if shape == "imagenet":
        h = int(rng.integers(HEIGHT[0], HEIGHT[1] + 1))
        aspect = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0]
        return h, int(round(h * aspect))
    return tuple(int(v) for v in rng.integers(SIDE[0], SIDE[1] + 1, 2))


def _make_image(seed: int, i: int, shape: str = "square") -> np.ndarray:
    """Image ``i``: a random box of a random photograph rescaled to H x W (``_shape``), flipped
    half the time, with a small per-channel gain."""
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    photo = _photo(PHOTOS[rng.integers(len(PHOTOS))])
    h, w = _shape(rng, shape)
    h0, w0 = photo.shape[:2]
    scale = max(h / h0, w / w0) * rng.uniform(1.0, 1.6)  # >= the smallest scale that covers h x w
    ch, cw = h / scale, w / scale  # the box in the photograph's pixels
    y0, x0 = rng.uniform(0, h0 - ch), rng.uniform(0, w0 - cw)
    im = Image.fromarray(photo).resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    a = np.asarray(im)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    gain = rng.uniform(0.9, 1.1, 3)
    return np.clip(a * gain, 0, 255).astype(np.uint8)


def _write(path: str, seed: int, i: int, shape: str = "square") -> None:
    from PIL import Image

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    Image.fromarray(_make_image(seed, i, shape)).save(tmp, "JPEG", quality=QUALITY)
    os.replace(tmp, path)  # a file that exists is complete


def _image_files(train: str):
    out = set()
    for dirpath, _, names in os.walk(train):
        out.update(os.path.join(dirpath, nm) for nm in names if nm.lower().endswith((".jpg", ".jpeg", ".png")))
    return out


def make_folder(root: str, n: int, seed: int = 0, classes: int = 10, progress: bool = True, shape: str = "square"):
    """An ImageFolder tree ``root/train/class<c>/<i>.jpg`` of ``n`` JPEGs (image i in class
    i % classes), deterministic from ``seed``; returns the file paths.  A folder made before with
    the same settings is reused as it is (only missing files are written, stray ones removed);
    a folder with images that ``make_folder`` did not make is refused."""
    spec = {
        "n": n,
        "seed": seed,
        "classes": classes,
        "side": list(SIDE),
        "quality": QUALITY,
        "photos": list(PHOTOS),
        "version": 1,
        **({"shape": shape} if shape != "square" else {}),  # (folders made before keep their key)
    }
    paths = _paths(root, n, classes)
    man = os.path.join(root, MANIFEST)
    old = None
    if os.path.isfile(man):
        with open(man) as f:
            old = json.load(f)
    train = os.path.join(root, "train")
    present = _image_files(train)
    if old is None and present:
        raise ValueError(f"make_folder: {train} holds images that make_folder did not write; give another root")
    same = old is not None and old.get("spec") == spec
    if same and old.get("complete") and present == set(paths):
        if progress:
            print(f"make_folder: reusing {n} images in {root}", flush=True)
        return paths
    os.makedirs(root, exist_ok=True)
    with open(man, "w") as f:
        json.dump({"spec": spec, "complete": False}, f)
    for stray in present - set(paths):
        os.remove(stray)
    todo = [i for i, p in enumerate(paths) if not (same and p in present)]
    for c in range(min(classes, n)):
        os.makedirs(os.path.join(train, f"class{c:02d}"), exist_ok=True)
    every = max(1, len(todo) // 10)
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL resizes and encodes without the GIL
        for k, _ in enumerate(pool.map(lambda i: _write(paths[i], seed, i, shape), todo), 1):
            if progress and len(todo) >= 200 and (k % every == 0 or k == len(todo)):
                print(f"make_folder: {k}/{len(todo)} images written ({time.perf_counter() - t:.1f} s)", flush=True)
    with open(man, "w") as f:
        json.dump({"spec": spec, "complete": True}, f)
    return paths


def default_root(n: int, seed: int, classes: int) -> str:
    return os.path.join(tempfile.gettempdir(), "fastssl-bench-folder", f"n{n}-seed{seed}-c{classes}")


# --------------------------------------------------------------------------- pipelines


def has_data_key(key: str) -> bool:
    """Whether this checkout's config schema has ``data.<key>`` (keys added in later versions)."""
    from fastssl.config import DataConfig

    return key in {f.name for f in dataclasses.fields(DataConfig)}


def base_overrides(root: str, size: int, batch: int, workers: int):
    return [
        "data.source=folder",
        f"data.path={root}",
        f"data.image_size={size}",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
    ]


def build(method: str, overrides, device: torch.device):
    """The pretraining loader as fastssl/train.py builds it (rank 0 of 1)."""
    from fastssl.config import load_config
    from fastssl.data.sources import build_source
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = load_config(os.path.join(ROOT, "configs", method, "builtin.yaml"), overrides)
    source = build_source(cfg)
    m = get_method(cfg.method.name)(
        cfg, build_backbone(cfg.model, source.image_size), source.image_size, len(source.pretrain)
    )
    m.begin_stage(0, source)
    device_id = 0 if device.type == "cuda" else None
    return cfg, m.loader(cfg, source, 0, 1, device_id, device.type)


def epochs_of(loader, device, counted):
    """A callable running the loader's next epoch (batches moved to ``device``); the images of
    the last epoch go to ``counted[0]``."""
    epoch = [0]

    def one_epoch():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for b in loader:
            for v in b["views"]:
                v.to(device, non_blocking=True)
            n += len(b["index"])
        counted[0] = n

    return one_epoch


def bench(method: str, root: str, size: int, batch: int, workers: int, repeats: int, pipelines=PIPELINES):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = base_overrides(root, size, batch, workers)
    reader = has_data_key("reader_workers")
    runs = []  # (pipeline, label, extra overrides)
    for p in pipelines:
        if p == "dali-gpu" and not torch.cuda.is_available():
            print("  dali-gpu: skipped (no CUDA GPU on this machine)", flush=True)
            continue
        if p.startswith("dali") and missing("nvidia.dali"):
            print(f"  {p}: skipped ({missing('nvidia.dali')})", flush=True)
            continue
        runs.append((p, LABELS[p], []))
        if p == "dali-cpu":
            if not reader:
                print("  dali-cpu reader_workers=0: not measured (this config has no data.reader_workers)", flush=True)
            else:
                from fastssl.config import DataConfig

                if DataConfig().reader_workers != 0:
                    runs.append((p, "dali-cpu reader_workers=0", ["data.reader_workers=0"]))
                else:
                    print("  dali-cpu reader_workers=0: the default row already reads on the main thread", flush=True)
    rows = []
    for pipeline, label, extra in runs:
        cfg, loader = build(method, common + [f"data.pipeline={pipeline}"] + extra, device)
        counted = [0]
        times = timed(epochs_of(loader, device, counted), repeats)
        del loader  # free the DALI pipeline / worker processes before the next one starts
        gc.collect()
        rows.append(
            {
                "kind": "pipeline",
                "method": method,
                "pipeline": pipeline,
                "label": label,
                "image_size": size,
                "batch": batch,
                "workers": workers,
                "reader_workers": cfg.data.reader_workers if reader and pipeline != "torch" else None,
                "images": counted[0],
                "images_per_s": summary(times, counted[0]),
            }
        )
        print(f"  {method} {size}px {label:26s} {rows[-1]['images_per_s']['median']:10.1f} images/s", flush=True)
    base = next((r for r in rows if r["pipeline"] == "torch"), None)
    for r in rows:
        r["ratio_vs_dataloader"] = r["images_per_s"]["median"] / base["images_per_s"]["median"] if base else None
    return rows


# --------------------------------------------------------------------------- the data check


def _time_source(method: str, overrides, train_start: bool) -> None:
    """(In a fresh process.)  Print the seconds of ``build_source`` as JSON: on the data keys
    alone, unvalidated, as ``python -m fastssl.data.check`` builds a source (the check alone) or,
    with ``train_start``, ``load_config`` (whose validation builds the source too) then
    ``build_source``, as fastssl/train.py starts."""
    import PIL.Image  # noqa: F401
    import tqdm  # noqa: F401
    from omegaconf import OmegaConf

    import fastssl.data.check  # noqa: F401  (imports out of the timings: what validation and the check use)
    import fastssl.models  # noqa: F401
    from fastssl.config import load_config
    from fastssl.data.sources import build_source

    t0 = time.perf_counter()
    if train_start:
        cfg = load_config(os.path.join(ROOT, "configs", method, "builtin.yaml"), overrides)
    else:
        data = OmegaConf.from_dotlist([o for o in overrides if o.startswith("data.")])
        cfg = OmegaConf.merge({"data": {"split": "pretrain", "image_size": None}}, data)
    t1 = time.perf_counter()
    s = build_source(cfg)
    t2 = time.perf_counter()
    images = len(s.pretrain) + len(s.test) + len(s.bad_files)
    print(json.dumps({"load_config_s": t1 - t0 if train_start else 0.0, "build_source_s": t2 - t1, "images": images}))


def check_timings(method: str, root: str, size: int, batch: int, workers: int):
    """build_source with an empty verdict cache, then with it filled, each in a fresh process;
    alone and as training starts."""
    rows = []
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    overrides = base_overrides(root, size, batch, workers)
    for train_start in (False, True):
        step = "load_config + build_source (train start)" if train_start else "build_source"
        with tempfile.TemporaryDirectory(prefix="fastssl-cache-") as cache:
            env["FASTSSL_CACHE"] = cache
            for state in ("empty", "filled"):
                code = (
                    f"from benchmarks.folder import _time_source; "
                    f"_time_source({method!r}, {list(overrides)!r}, {train_start})"
                )
                p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    raise RuntimeError(f"{step} ({state} cache) exited {p.returncode}:\n{p.stderr[-3000:]}")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                sec = res["load_config_s"] + res["build_source_s"]
                rows.append(
                    {
                        "kind": "check",
                        "step": step,
                        "cache": state,
                        "seconds": sec,
                        "load_config_s": res["load_config_s"],
                        "build_source_s": res["build_source_s"],
                        "images": res["images"],
                        "images_per_s": res["images"] / sec,
                    }
                )
                print(
                    f"  check: {step:42s} {state:6s} cache {sec:8.3f} s {rows[-1]['images_per_s']:10.0f} images/s",
                    flush=True,
                )
    return rows


# --------------------------------------------------------------------------- entry point


def table(rows, a, workers: int) -> str:
    pipe = [r for r in rows if r["kind"] == "pipeline"]
    lines = [
        "| method | pipeline | workers/threads | reader workers | images/s (median) | min | max | vs DataLoader |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in pipe:
        ips = r["images_per_s"]
        rw = "-" if r["reader_workers"] is None else r["reader_workers"]
        ratio = "-" if r["ratio_vs_dataloader"] is None else f"{r['ratio_vs_dataloader']:.2f}x"
        lines.append(
            f"| {r['method']} | {r['label']} | {r['workers']} | {rw} | {ips['median']:.1f} | "
            f"{ips['min']:.1f} | {ips['max']:.1f} | {ratio} |"
        )
    n = pipe[0]["images"] if pipe else a.images
    text = "\n".join(lines) + (
        f"\n\n{a.images} JPEGs ({SIDE[0]}-{SIDE[1]} px a side, quality {QUALITY}) decoded and resized to {a.size} px, "
        f"{n} images per epoch, batch {a.batch}, {a.repeats} repeats after a warm-up epoch; "
        f"{os.cpu_count()} CPU cores, data.num_workers={workers} (DataLoader workers / DALI threads)."
    )
    chk = [r for r in rows if r["kind"] == "check"]
    if chk:
        lines = ["| data check | verdict cache | seconds | of which build_source | images/s |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['step']} | {r['cache']} | {r['seconds']:.3f} | {r['build_source_s']:.3f} | {r['images_per_s']:.0f} |"
            for r in chk
        ]
        text += (
            "\n\n" + "\n".join(lines) + "\n\nEach in a fresh process (imports not counted), FASTSSL_CACHE a new "
            "empty folder for the first; the files are in the OS page cache (just written), so this is decoding, "
            "not disk reads."
        )
    return text


def main(argv=None):
    from fastssl.methods import for_tools

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224, help="data.image_size: the side images are resized to")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["invp"], choices=for_tools("pipelines"))
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="data.num_workers (default: the CPU cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--root", default=None, help="where the folder is generated (default: a cache under the temp dir)")
    p.add_argument("--no-check", action="store_true", help="skip the data-check timings")
    p.add_argument("--tiny", action="store_true", help="64 images, 64 px, batch 32, 1 repeat (the tests)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    a = p.parse_args(argv)
    if a.tiny:
        a.images, a.size, a.batch, a.repeats = 64, 64, 32, 1
    workers = max(1, a.workers)
    root = a.root or default_root(a.images, a.seed, a.classes)
    make_folder(root, a.images, a.seed, a.classes)
    print(f"folder: {root}, {a.images} images; {os.cpu_count()} CPU cores, data.num_workers={workers}", flush=True)
    rows = []
    if not a.no_check:
        rows += check_timings(a.methods[0], root, a.size, a.batch, workers)
    for m in a.methods:
        rows += bench(m, root, a.size, a.batch, workers, a.repeats, a.pipelines)
    pipe = [r for r in rows if r["kind"] == "pipeline"]
    publish(
        "folder",
        rows,
        table(rows, a, workers),
        a.out,
        [f"{r['method']} {r['label']}" for r in pipe],
        [r["ratio_vs_dataloader"] or 0.0 for r in pipe],
        "images/s vs torchvision DataLoader",
        f"image folder, {a.size} px",
    )


if __name__ == "__main__":
    main()
