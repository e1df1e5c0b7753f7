"""Materialised Exemplar-CNN surrogate sets: one epoch of patches written once and read back
from a memory map instead of being generated every epoch (``data/surrogate.py`` makes them).

    python -m fastssl.data.exemplar --config configs/exemplar/stl10.yaml --out data/surrogate
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from fastssl.data.executors import build_loader
from fastssl.data.executors.base import Executor
from fastssl.data.plan import global_batches
from fastssl.data.surrogate import SurrogateSet, seed_surrogate_set, surrogate_recipe
from fastssl.errors import ConfigError


class FileSurrogateLoader(Executor):
    """Patches materialised once (``python -m fastssl.data.exemplar``), read from a memory map."""

    def __init__(self, folder: str, batch_size, seed, rank, world):
        self.patches, self.rows, _ = open_materialised(folder)
        super().__init__(None, None, batch_size, seed, rank, world, items=len(self.rows))

    def __iter__(self):
        batches = global_batches(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows)),
                                 self.batch_size, self.world)
        for k in range(self.start_step, self.steps_per_epoch):
            sel = np.sort(batches[k, self.rank])  # sorted: sequential reads
            yield {"views": [torch.from_numpy(self.patches[sel])], "index": torch.from_numpy(self.rows[sel])}


def build_surrogate_loader(cfg, source, sset, aug, pca, rank=0, world=1, device_id=None, materialised=True,
                           device="cpu"):
    """Patches of ``sset``: from ``method.surrogate_dir`` when set (and ``materialised``), else
    generated each epoch by the ``data.pipeline`` executor from the surrogate recipe."""
    m = cfg.method
    if m.surrogate_dir and materialised:
        return FileSurrogateLoader(m.surrogate_dir, cfg.data.batch_size, cfg.seed, rank, world)
    recipe = surrogate_recipe(sset, aug, m.patch_size, source.image_size, pca, m.patches_per_class)
    return build_loader(cfg, source, source.pretrain, recipe, rank, world, device_id, device)


# --------------------------------------------------------------------------- materialised sets


def open_materialised(folder: str):
    """(patches memmap (n, P, P, 3) uint8, member rows (n,), meta dict); errors name the file."""
    meta_file = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_file):
        raise ConfigError(f"method.surrogate_dir: {meta_file} not found (write it with python -m fastssl.data.exemplar)")
    with open(meta_file) as f:
        meta = json.load(f)
    try:
        patches = np.load(os.path.join(folder, "patches.npy"), mmap_mode="r")
        rows = np.load(os.path.join(folder, "rows.npy"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.surrogate_dir: {folder}: {e}") from None
    if patches.ndim != 4 or patches.shape[3] != 3 or len(patches) != len(rows) or patches.dtype != np.uint8:
        raise ConfigError(f"method.surrogate_dir: {folder}/patches.npy has shape {patches.shape} {patches.dtype}, "
                          f"expected ({len(rows)}, P, P, 3) uint8")
    return patches, rows, meta


def materialise(loader, folder: str, sset: SurrogateSet, pca, progress: bool = True) -> float:
    """Run one epoch of ``loader`` into ``folder``/patches.npy (+ rows.npy, meta.json); returns
    patches per second."""
    import time

    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    n, p = len(loader) * loader.batch_size, loader.recipe.size  # patches, patch side
    tmp = os.path.join(folder, "patches.npy.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, p, p, 3))
    rows = np.empty(n, np.int64)
    loader.set_epoch(0)
    t0, k = time.perf_counter(), 0
    for batch in tqdm(loader, total=len(loader), desc="surrogate patches", unit="batch", disable=not progress):
        x = batch["views"][0]
        out[k:k + len(x)] = x.cpu().numpy()
        rows[k:k + len(x)] = batch["index"].cpu().numpy().reshape(-1)
        k += len(x)
    rate = n / (time.perf_counter() - t0)
    out.flush()
    del out
    os.replace(tmp, os.path.join(folder, "patches.npy"))
    np.save(os.path.join(folder, "rows.npy"), rows)
    mean, vecs = pca
    torch.save({**sset.state(), "pca_mean": torch.from_numpy(mean), "pca_vecs": torch.from_numpy(vecs)},
               os.path.join(folder, "surrogate_set.pt"))  # the basis: validation patches use the same contrast
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"patches": n, "classes": sset.num_classes, "patch": p, "rate": rate}, f)
    return rate


def main(argv=None) -> int:
    import argparse
    import sys

    from fastssl.config import load_config
    from fastssl.data.sources import build_source

    p = argparse.ArgumentParser(prog="python -m fastssl.data.exemplar",
                                description="Materialise an Exemplar-CNN surrogate set (one epoch of patches) to a folder.")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="folder for patches.npy, rows.npy, surrogate_set.pt, meta.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, list(a.overrides) + ["method.surrogate_dir=null"])
        if cfg.method.name != "exemplar":
            raise ConfigError(f"method.name: {cfg.method.name!r}; this tool needs an exemplar config")
    except ConfigError as e:
        print(f"fastssl.data.exemplar: config error: {e}", file=sys.stderr)
        return 2
    source = build_source(cfg)
    sset, pca = seed_surrogate_set(cfg, source)
    loader = build_surrogate_loader(cfg, source, sset, cfg.method.aug, pca)
    rate = materialise(loader, a.out, sset, pca)
    print(f"fastssl.data.exemplar: {len(loader) * cfg.data.batch_size} patches of {sset.num_classes} classes "
          f"-> {a.out} ({rate:.0f} patches/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
