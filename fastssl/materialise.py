"""Materialise an Exemplar-CNN surrogate set (one epoch of patches) to a folder, read by
``method.surrogate_dir`` instead of generating patches every epoch:

    python -m fastssl.materialise --config configs/exemplar/stl10.yaml --out data/surrogate
"""

from __future__ import annotations

import argparse
import sys

from fastssl.config import load_config
from fastssl.data.sources import build_source
from fastssl.errors import ConfigError
from fastssl.methods.exemplar.materialised import build_surrogate_loader, materialise
from fastssl.methods.exemplar.surrogate import seed_surrogate_set


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.materialise",
        description="Materialise an Exemplar-CNN surrogate set (one epoch of patches) to a folder.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="folder for patches.npy, rows.npy, surrogate_set.pt, meta.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:  # (a method without a surrogate set has no method.surrogate_dir: the override is refused, naming it)
        cfg = load_config(a.config, list(a.overrides) + ["method.surrogate_dir=null"])
    except ConfigError as e:
        print(f"fastssl.materialise: config error: {e}", file=sys.stderr)
        return 2
    source = build_source(cfg)
    sset, pca = seed_surrogate_set(cfg, source)
    loader = build_surrogate_loader(cfg, source, sset, cfg.method.aug, pca)
    rate = materialise(loader, a.out, sset, pca)
    print(
        f"fastssl.materialise: {len(loader) * cfg.data.batch_size} patches of {sset.num_classes} classes "
        f"-> {a.out} ({rate:.0f} patches/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
