"""Writers of tiny datasets in the official on-disk formats (used by several tests)."""

import os
import pickle

import numpy as np
from PIL import Image


def write_stl10(root, n_unl=6, n_train=5, n_test=4, seed=0):
    """STL-10 binaries: each image = 3 planes of 96x96, each plane column-major; labels 1..10."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for name, n in (("unlabeled", n_unl), ("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)  # N, H, W, C
        x.transpose(0, 3, 2, 1).tofile(os.path.join(root, f"{name}_X.bin"))  # N, C, W, H on disk
        out[name] = x
        if name != "unlabeled":
            y = rng.integers(1, 11, n).astype(np.uint8)
            y.tofile(os.path.join(root, f"{name}_y.bin"))
            out[name + "_y"] = y.astype(np.int64) - 1
    folds = [rng.permutation(n_train)[:3] for _ in range(10)]
    with open(os.path.join(root, "fold_indices.txt"), "w") as f:
        for fo in folds:
            f.write(" ".join(map(str, fo)) + " \n")
    out["folds"] = folds
    return out


def write_cifar(root, kind="cifar10", n_per_batch=7, seed=0):
    """The python-pickle batches: dict(b'data'=(N, 3072) uint8 CHW-flat, b'labels'/b'fine_labels')."""
    rng = np.random.default_rng(seed)
    sub, names, key, ncls = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[kind]
    d = os.path.join(root, sub)
    os.makedirs(d, exist_ok=True)
    out = {}
    for name in names:
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, ncls, n_per_batch).tolist()
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(
                {b"data": x.transpose(0, 3, 1, 2).reshape(n_per_batch, -1), key: y, b"batch_label": name.encode()}, f
            )
        out[name] = (x, np.array(y))
    return d, out


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30), seed=0, smooth=False):
    """class-per-sub-folder tree of JPEG and PNG files (noise, or smooth colour fields)."""
    rng = np.random.default_rng(seed)
    files = []
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            if smooth:
                coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
                arr = np.asarray(coarse.resize(size, Image.BILINEAR))
            else:
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            p = os.path.join(root, c, f"img{i}.{ext}")
            Image.fromarray(arr).save(p)
            files.append((p, arr))
    return files


def write_idx(root, n_train=12, n_test=6, side=28, num_classes=10, gz=True, prefix="", seed=0):
    """The MNIST family's IDX files: a big-endian header (magic 0x00000803 for images, 0x00000801 for
    labels, then each dimension as a 4-byte integer) and the unsigned bytes, row-major; gzipped or
    not.  Returns {split: (images (N, side, side), labels (N,))}."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        y = rng.integers(0, num_classes, n).astype(np.uint8)
        y[: min(n, num_classes)] = np.arange(min(n, num_classes))  # every class present in a big enough split
        for kind, body, head in (
            ("images-idx3-ubyte", x, struct.pack(">IIII", 0x803, n, side, side)),
            ("labels-idx1-ubyte", y, struct.pack(">II", 0x801, n)),
        ):
            name = os.path.join(root, f"{prefix}{stem}-{kind}" + (".gz" if gz else ""))
            with (gzip.open if gz else open)(name, "wb") as f:
                f.write(head + body.tobytes())
        out[split] = (x, y.astype(np.int64))
    return out
