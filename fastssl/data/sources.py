"""Image sources: where the pixels come from, in their real on-disk formats.

The array sources are the built-in set, STL-10's binaries, CIFAR's pickles and the MNIST family's
IDX files (``idx``: MNIST, Fashion-MNIST, KMNIST, EMNIST; grey, replicated to RGB and zero-padded
to ``data.image_size``, 32 px by default); ``folder`` reads image files.

Each source yields up to three ``Split``s: ``pretrain`` (what self-supervised training sees),
``train`` (labeled, for evaluation protocols) and ``test`` (labeled).  Array-backed splits hold
uint8 NHWC arrays (memory-mapped for STL-10); folder splits hold file paths whose encoded bytes
the pipelines decode (DALI's image decoder, or PIL for the torch baseline).

``check_source(cfg)`` validates the files cheaply (presence, sizes, pickle shapes, IDX headers and labels) before any
image data is loaded, raising ``ConfigError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from fastssl.errors import ConfigError
from fastssl.registry import Registry

# data.source -> builder(cfg) -> Source: adding a source is one decorated builder in this file
SOURCES = Registry("data source", "data.source")

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
STL_SIDE = 96
STL_BYTES = 3 * STL_SIDE * STL_SIDE


@dataclass
class Split:
    """A list of images and (optionally) their labels."""

    images: Optional[np.ndarray] = None  # (N, H, W, 3) uint8, array-backed sources
    files: Optional[List[str]] = None  # encoded JPEG/PNG files, folder source
    labels: Optional[np.ndarray] = None  # (N,) int64, or None when unlabeled
    sizes: Optional[np.ndarray] = None  # (N, 2) int32 height, width of each file (recorded by the data check)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    @property
    def encoded(self) -> bool:
        return self.files is not None


@dataclass
class Source:
    name: str
    image_size: int
    num_classes: int
    pretrain: Split
    train: Split
    test: Split
    mean: tuple = (0.5, 0.5, 0.5)  # per-channel, on [0, 1] pixels
    std: tuple = (0.25, 0.25, 0.25)
    folds: Optional[List[np.ndarray]] = None  # STL-10's predefined train folds
    bad_files: Dict[str, str] = field(default_factory=dict)  # folder: files left out, with the reason

    @property
    def pretrain_labels(self) -> np.ndarray:
        """Label of each pre-training image, -1 where unknown (the pre-training split is
        the train split, or unlabeled images followed by the train split)."""
        n, nt = len(self.pretrain), len(self.train)
        out = np.full(n, -1, np.int64)
        if self.train.labels is not None and n >= nt:
            out[n - nt :] = self.train.labels
        return out


# --------------------------------------------------------------------------- builtin

_SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "xcross", "frame")


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Mask of one shape of radius r centred at the origin of the (u, v) pixel offsets."""
    au, av = np.abs(u), np.abs(v)
    t = max(1.0, 0.3 * r)  # stroke half-width
    if kind == "disc":
        return u * u + v * v <= r * r
    if kind == "square":
        return np.maximum(au, av) <= r
    if kind == "triangle":
        return (v <= r * 0.8) & (v >= 2 * au - r)
    if kind == "cross":
        return ((au <= t) & (av <= r)) | ((av <= t) & (au <= r))
    if kind == "ring":
        d = np.sqrt(u * u + v * v)
        return (d <= r) & (d >= r - 2 * t)
    if kind == "hbar":
        return (au <= r) & (av <= t)
    if kind == "vbar":
        return (av <= r) & (au <= t)
    if kind == "diamond":
        return au + av <= r
    if kind == "xcross":
        return (np.abs(u - v) <= 1.2 * t) & (au <= r) | (np.abs(u + v) <= 1.2 * t) & (au <= r)
    if kind == "frame":
        m = np.maximum(au, av)
        return (m <= r) & (m >= r - 2 * t)
    raise ValueError(kind)


def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) linear-interpolation weights: smooth fields from a coarse grid."""
    pos = np.linspace(0, coarse - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    w = pos - lo
    m = np.zeros((size, coarse), np.float32)
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] = w
    return m


def make_builtin(n: int, size: int, num_classes: int, seed: int):
    """Deterministic labeled images: class c = scattered copies of shape c.

    Each image holds 5-9 copies of its class's shape at random positions and radii, each copy
    in its own random colour, on a background of smooth random colour blotches, with pixel
    noise.  Colour and position say nothing about the class and differ between two patches
    of one image; only the shape is shared, so Spatial Contrasting (and any method that
    matches views of one image) has to learn shape, and the class is what a probe can read.
    """
    if num_classes > len(_SHAPES):
        raise ConfigError(f"data.builtin.num_classes: at most {len(_SHAPES)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    up = _upsample_matrix(size, 5)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        coarse = rng.uniform(0.0, 1.0, (5, 5, 3)).astype(np.float32)
        img = np.einsum("yi,ijc,xj->yxc", up, coarse, up, optimize=True)
        for _ in range(rng.integers(5, 10)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(0.08, 0.16) * size
            mask = _shape_mask(_SHAPES[labels[i]], xx - cx, yy - cy, r)
            img[mask] = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        img = img + rng.normal(0, 0.04, img.shape)
        images[i] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, labels


@SOURCES.register("builtin")
def _builtin(cfg) -> Source:
    b = cfg.data.builtin
    x, y = make_builtin(b.num_train + b.num_test, b.image_size, b.num_classes, b.seed)
    tr, te = slice(0, b.num_train), slice(b.num_train, None)
    train = Split(images=x[tr], labels=y[tr])
    return Source(
        "builtin",
        b.image_size,
        b.num_classes,
        pretrain=Split(images=x[tr]),
        train=train,
        test=Split(images=x[te], labels=y[te]),
        mean=(0.5, 0.5, 0.5),
        std=(0.3, 0.3, 0.3),
    )


# --------------------------------------------------------------------------- STL-10

STL_FILES = ("unlabeled_X.bin", "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "fold_indices.txt")


def _stl_dir(path: str) -> str:
    for d in (path, os.path.join(path, "stl10_binary")):
        if os.path.isfile(os.path.join(d, "train_X.bin")):
            return d
    raise ConfigError(f"data.path: no STL-10 binaries (train_X.bin) in {path} or {path}/stl10_binary")


def _stl_images(file: str) -> np.ndarray:
    size = os.path.getsize(file)
    if size == 0 or size % STL_BYTES:
        raise ConfigError(
            f"data.path: {file}: {size} bytes is not a whole number of 3x96x96 images ({STL_BYTES} bytes each)"
        )
    # the official files store each image as 3 planes, each plane column-major
    raw = np.memmap(file, np.uint8, "r", shape=(size // STL_BYTES, 3, STL_SIDE, STL_SIDE))
    return raw.transpose(0, 3, 2, 1)  # -> N, H, W, C (a view; pixels are read on demand)


def _stl_labels(file: str, n: int) -> np.ndarray:
    y = np.fromfile(file, np.uint8)
    if len(y) != n:
        raise ConfigError(f"data.path: {file}: {len(y)} labels for {n} images")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise ConfigError(f"data.path: {file}: labels must be 1..10, found {y.min()}..{y.max()}")
    return y.astype(np.int64) - 1


def read_stl_folds(file: str, n_train: int) -> List[np.ndarray]:
    folds = []
    with open(file) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                idx = np.array([int(t) for t in line.split()], np.int64)
            except ValueError:
                raise ConfigError(f"data.path: {file} line {ln}: not a list of integers") from None
            if len(idx) and (idx.min() < 0 or idx.max() >= n_train):
                raise ConfigError(f"data.path: {file} line {ln}: index out of range 0..{n_train - 1}")
            folds.append(idx)
    return folds


@SOURCES.register("stl10")
def _stl10(cfg) -> Source:
    d = _stl_dir(cfg.data.path)
    for f in STL_FILES[1:5]:
        if not os.path.isfile(os.path.join(d, f)):
            raise ConfigError(f"data.path: missing STL-10 file {os.path.join(d, f)}")
    train_x = _stl_images(os.path.join(d, "train_X.bin"))
    test_x = _stl_images(os.path.join(d, "test_X.bin"))
    train = Split(images=train_x, labels=_stl_labels(os.path.join(d, "train_y.bin"), len(train_x)))
    test = Split(images=test_x, labels=_stl_labels(os.path.join(d, "test_y.bin"), len(test_x)))
    unl = os.path.join(d, "unlabeled_X.bin")
    pretrain = _stl_images(unl) if os.path.isfile(unl) else None
    if cfg.data.split == "pretrain" and pretrain is not None:
        pre = Split(files=None, images=_Concat(pretrain, train_x))
    else:
        pre = Split(images=train_x)
    fold_file = os.path.join(d, "fold_indices.txt")
    folds = read_stl_folds(fold_file, len(train_x)) if os.path.isfile(fold_file) else None
    return Source(
        "stl10", STL_SIDE, 10, pre, train, test, mean=(0.447, 0.440, 0.407), std=(0.260, 0.257, 0.271), folds=folds
    )


class _Concat:
    """Two NHWC arrays seen as one, without copying (STL-10 unlabeled + train is ~3 GB)."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.shape = (len(a) + len(b),) + tuple(a.shape[1:])
        self.dtype = a.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]
        idx = np.arange(len(self))[i]
        return np.stack([self[int(j)] for j in idx])


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_CACHE: Dict[str, tuple] = {}


def _cifar_batch(file: str, label_key: bytes, num_classes: int):
    if file in _CIFAR_CACHE:
        return _CIFAR_CACHE[file]
    if not os.path.isfile(file):
        raise ConfigError(f"data.path: missing CIFAR file {file}")
    try:
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ConfigError(f"data.path: {file}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ConfigError(f"data.path: {file}: pickle lacks the fields b'data' and {label_key!r}")
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ConfigError(f"data.path: {file}: field b'data' has shape {x.shape} {x.dtype}, expected (N, 3072) uint8")
    y = np.asarray(d[label_key], np.int64)
    if y.shape != (len(x),):
        raise ConfigError(f"data.path: {file}: {len(y)} labels for {len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"data.path: {file}: labels must be 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    out = (x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y)
    _CIFAR_CACHE[file] = out
    return out


@SOURCES.register("cifar100")  # (the decorator nearest the function registers first)
@SOURCES.register("cifar10")
def _cifar(cfg) -> Source:
    name = cfg.data.source
    sub, train_files, test_files, key, ncls = _CIFAR[name]
    d = cfg.data.path
    if not os.path.isfile(os.path.join(d, train_files[0])) and os.path.isdir(os.path.join(d, sub)):
        d = os.path.join(d, sub)

    def load(files):
        parts = [_cifar_batch(os.path.join(d, f), key, ncls) for f in files]
        return Split(images=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]))

    train, test = load(train_files), load(test_files)
    stats = {
        "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
        "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    }[name]
    return Source(name, 32, ncls, Split(images=train.images), train, test, *stats)


# --------------------------------------------------------------------------- IDX (MNIST family)

IDX_SETS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes (0x08), 3 dimensions (images) / 1 (labels)
IDX_DEFAULT_SIZE = 32  # data.image_size=null: 28 px images zero-padded by 2 px on each side


def _idx_file(d: str, name: str) -> str:
    """The one file of ``d`` named ``name`` or ``<prefix>name``, gzipped or not (EMNIST's files
    carry a prefix: emnist-letters-train-images-idx3-ubyte.gz)."""
    found = sorted(f for f in os.listdir(d) if f.endswith((name, name + ".gz")) and os.path.isfile(os.path.join(d, f)))
    if not found:
        raise ConfigError(f"data.path: missing IDX file {os.path.join(d, name)}[.gz]")
    if len(found) > 1:
        raise ConfigError(
            f"data.path: {d} holds {len(found)} IDX files ending in {name}[.gz] ({', '.join(found)}): "
            f"point data.path at a folder with one set"
        )
    return os.path.join(d, found[0])


def _idx_open(file: str):
    import gzip

    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def _idx_header(file: str, ndim: int) -> tuple:
    """The dimensions of an IDX file of unsigned bytes, from its header and its size (the gzip
    trailer's length for .gz files): no pixel is read.  Raises ConfigError naming the file and
    the field (magic, a dimension, the length) that is wrong."""
    what = "images" if ndim == 3 else "labels"
    want = IDX_MAGIC[ndim]
    try:
        with _idx_open(file) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError) as e:
        raise ConfigError(f"data.path: {file}: not readable ({type(e).__name__}: {e})") from None
    if len(head) < 4:
        raise ConfigError(f"data.path: {file}: {len(head)} bytes, shorter than an IDX header (magic)")
    magic = int.from_bytes(head[:4], "big")
    if magic != want:
        raise ConfigError(
            f"data.path: {file}: magic 0x{magic:08x}, expected 0x{want:08x} (IDX {what}: unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})"
        )
    if len(head) < 4 + 4 * ndim:
        raise ConfigError(f"data.path: {file}: truncated header ({len(head)} of {4 + 4 * ndim} bytes)")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    names = ("count", "rows", "columns")
    for i, n in enumerate(dims):
        if n < 1 or (i > 0 and n > 4096):
            raise ConfigError(
                f"data.path: {file}: header field {names[i]} = {n}, expected 1..{4096 if i else 2**31 - 1}"
            )
    expected = len(head) + int(np.prod(dims, dtype=np.int64))
    if file.endswith(".gz"):
        with open(file, "rb") as f:  # the gzip trailer's ISIZE: the uncompressed length mod 2^32
            f.seek(max(0, os.path.getsize(file) - 4))
            isize = int.from_bytes(f.read(4), "little")
        if isize != expected % 2**32:
            raise ConfigError(
                f"data.path: {file}: length {isize} bytes uncompressed (gzip trailer), expected {expected} "
                f"for the header's {' x '.join(map(str, dims))} {what}: truncated or not one gzip stream"
            )
    else:
        size = os.path.getsize(file)
        if size != expected:
            raise ConfigError(
                f"data.path: {file}: length {size} bytes, expected {expected} for the header's "
                f"{' x '.join(map(str, dims))} {what}" + (" (truncated)" if size < expected else "")
            )
    return dims


def _idx_data(file: str, ndim: int, dims: tuple) -> np.ndarray:
    n = int(np.prod(dims, dtype=np.int64))
    try:
        with _idx_open(file) as f:
            f.read(4 + 4 * ndim)
            raw = f.read(n)
    except (OSError, EOFError) as e:  # e.g. a gzip stream cut short whose trailer looked right
        raise ConfigError(f"data.path: {file}: not readable to its end ({type(e).__name__}: {e})") from None
    if len(raw) != n:
        raise ConfigError(f"data.path: {file}: {len(raw)} data bytes, expected {n} (truncated)")
    return np.frombuffer(raw, np.uint8).reshape(dims)


def read_idx(file: str, ndim: int) -> np.ndarray:
    """The whole array of an IDX file of unsigned bytes (``ndim`` 3: images, 1: labels), checked."""
    return _idx_data(file, ndim, _idx_header(file, ndim))


def idx_files(d: str) -> Dict[str, tuple]:
    """split -> (images file, labels file) of an IDX set in folder ``d``."""
    return {split: (_idx_file(d, im), _idx_file(d, lb)) for split, (im, lb) in IDX_SETS.items()}


def check_idx(d: str, image_size: Optional[int]) -> Dict[str, object]:
    """Validate an IDX set from its headers and its labels (no pixel is read): magic numbers,
    dimensions, lengths, image and label counts, and label ranges; returns the set's sizes."""
    files = idx_files(d)
    shapes, labels = {}, {}
    for split, (im, lb) in files.items():
        n, rows, cols = _idx_header(im, 3)
        (m,) = _idx_header(lb, 1)
        if m != n:
            raise ConfigError(f"data.path: {lb}: header field count = {m} labels, but {im} holds {n} images")
        shapes[split] = (rows, cols)
        labels[split] = _idx_data(lb, 1, (m,))
    if shapes["test"] != shapes["train"]:
        r, c = shapes["test"]
        raise ConfigError(
            f"data.path: {files['test'][0]}: images of {r}x{c} px, but the train images are "
            f"{shapes['train'][0]}x{shapes['train'][1]} px"
        )
    ntr = int(labels["train"].max()) + 1
    bad = np.flatnonzero(labels["test"] >= ntr)
    if len(bad):
        raise ConfigError(
            f"data.path: {files['test'][1]}: label {int(labels['test'][bad[0]])} at index {int(bad[0])} is outside "
            f"the train labels' range 0..{ntr - 1}"
        )
    rows, cols = shapes["train"]
    size = image_size if image_size is not None else max(IDX_DEFAULT_SIZE, rows, cols)
    return dict(
        files=files,
        native=(rows, cols),
        image_size=size,
        num_classes=ntr,
        num_train=len(labels["train"]),
        num_test=len(labels["test"]),
        labels=labels,
    )


def fit_grey(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) grey uint8 -> (N, size, size, 3): zero-padded (centred) when ``size`` is at least
    the image's side, else resized (antialiased bilinear, PIL); grey replicated to RGB."""
    n, h, w = x.shape
    if size >= h and size >= w:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, size, size), np.uint8)
        out[:, top : top + h, left : left + w] = x
    else:
        from PIL import Image

        out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in x])
    return np.repeat(out[..., None], 3, axis=3)


_IDX: Dict[tuple, Source] = {}  # this process's IDX sets (decompressed and padded once)


@SOURCES.register("idx")
def _idx(cfg) -> Source:
    info = check_idx(cfg.data.path, cfg.data.image_size)  # (headers and labels: cheap, every time)
    stamps = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for pair in info["files"].values() for f in pair)
    key = (os.path.abspath(cfg.data.path), cfg.data.image_size, stamps)
    if key not in _IDX:
        size, splits = info["image_size"], {}
        for split, (im, _) in info["files"].items():
            x = _idx_data(im, 3, (len(info["labels"][split]),) + info["native"])
            if os.path.basename(im).startswith("emnist"):
                x = x.transpose(0, 2, 1)  # EMNIST stores each image transposed
            splits[split] = Split(images=fit_grey(x, size), labels=info["labels"][split].astype(np.int64))
        sample = splits["train"].images[:: max(1, len(splits["train"]) // 10000), :, :, 0]
        mean, std = float(sample.mean()) / 255, float(sample.std()) / 255
        _IDX[key] = Source(
            "idx",
            size,
            info["num_classes"],
            pretrain=Split(images=splits["train"].images),
            train=splits["train"],
            test=splits["test"],
            mean=(mean,) * 3,
            std=(max(std, 1e-3),) * 3,
        )
    return _IDX[key]


# --------------------------------------------------------------------------- folder


def _list_images(root: str):
    """Files of ``root``: class per sub-folder (labels) or a flat folder (no labels)."""
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if classes:
        files, labels = [], []
        for c, cls in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, cls))):
                for nm in sorted(names):
                    if nm.lower().endswith(IMAGE_EXTS):
                        files.append(os.path.join(dirpath, nm))
                        labels.append(c)
        return files, np.array(labels, np.int64), classes
    files = [os.path.join(root, e) for e in entries if e.lower().endswith(IMAGE_EXTS)]
    return files, None, []


def _usable(files, labels, ok, hw):
    """The usable files (``ok``: file -> index in the check) with their labels and sizes."""
    keep = [i for i, f in enumerate(files) if f in ok]
    sizes = hw[[ok[files[i]] for i in keep]].reshape(-1, 2).astype(np.int32)
    return [files[i] for i in keep], (labels[keep] if labels is not None else None), sizes


_FOLDERS: Dict[tuple, Source] = {}  # this process's folder sources: listed and checked once per run


@SOURCES.register("folder")
def _folder(cfg) -> Source:
    key = (os.path.abspath(cfg.data.path), cfg.data.image_size, cfg.data.split)
    if key not in _FOLDERS:
        _FOLDERS[key] = _list_folder(cfg)
    return _FOLDERS[key]


def _list_folder(cfg) -> Source:
    from fastssl.data.check import check_files

    root = cfg.data.path
    size = cfg.data.image_size or 96
    has_splits = os.path.isdir(os.path.join(root, "train"))
    tr_root = os.path.join(root, "train") if has_splits else root
    files, labels, classes = _list_images(tr_root)
    if not files:
        raise ConfigError(f"data.path: no .jpg/.jpeg/.png images found under {tr_root}")
    test_files, test_labels = [], None
    for name in ("val", "test"):
        if has_splits and os.path.isdir(os.path.join(root, name)):
            test_files, test_labels, tcls = _list_images(os.path.join(root, name))
            if tcls and tcls != classes:
                raise ConfigError(f"data.path: class folders of {root}/{name} differ from {tr_root}")
            break
    unl = os.path.join(root, "unlabeled")
    unl_files = _list_images(unl)[0] if has_splits and os.path.isdir(unl) else []
    # every image is decoded once (cached) so that a bad file is left out now, not met mid-epoch,
    # and its size is known before any crop is planned
    v = check_files(unl_files + files + test_files, root)
    bad = v.bad
    ok = {f: i for i, f in enumerate(v.files) if v.code[i] != 2}
    files, labels, sizes = _usable(files, labels, ok, v.hw)
    test_files, test_labels, test_sizes = _usable(test_files, test_labels, ok, v.hw)
    unl_files, _, unl_sizes = _usable(unl_files, None, ok, v.hw)
    if not files:
        first = next(iter(bad.items()))
        raise ConfigError(
            f"data.path: none of the {len(bad)} images under {tr_root} can be decoded "
            f"(e.g. {first[0]}: {first[1]}); see python -m fastssl.data.check {root}"
        )
    train = Split(files=files, labels=labels, sizes=sizes)
    test = Split(files=test_files, labels=test_labels, sizes=test_sizes)
    ncls = max(len(classes), 1)
    if cfg.data.split == "pretrain":  # unlabeled first
        pre = Split(files=unl_files + files, sizes=np.concatenate([unl_sizes, sizes]))
    else:
        pre = Split(files=files, sizes=sizes)
    return Source(
        "folder", size, ncls, pre, train, test, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bad_files=bad
    )


# --------------------------------------------------------------------------- entry points


def _check_path(cfg) -> None:
    if cfg.data.source == "builtin":
        return
    p = cfg.data.path
    if not p:
        raise ConfigError(f"data.path: required for data.source={cfg.data.source}")
    if not os.path.isdir(p):
        raise ConfigError(f"data.path: not a directory: {p}")


def check_source(cfg) -> Dict[str, int]:
    """Validate a source's files and return its sizes, without reading image data."""
    _check_path(cfg)
    src = cfg.data.source
    if src == "builtin":
        b = cfg.data.builtin
        for k in ("num_train", "num_test", "image_size", "num_classes"):
            if getattr(b, k) < 1:
                raise ConfigError(f"data.builtin.{k}: must be >= 1, got {getattr(b, k)}")
        if b.image_size < 8:
            raise ConfigError(f"data.builtin.image_size: must be >= 8, got {b.image_size}")
        if b.num_classes > len(_SHAPES):
            raise ConfigError(f"data.builtin.num_classes: at most {len(_SHAPES)}, got {b.num_classes}")
        return dict(
            image_size=b.image_size,
            num_pretrain=b.num_train,
            num_train=b.num_train,
            num_test=b.num_test,
            num_classes=b.num_classes,
        )
    if cfg.data.image_size is not None and src not in ("folder", "idx"):
        raise ConfigError(f"data.image_size: only the folder and idx sources are resized; {src} images are fixed-size")
    if src == "idx":  # headers and labels only: the pixels are read when the run builds the source
        if cfg.data.image_size is not None and cfg.data.image_size < 8:
            raise ConfigError(f"data.image_size: must be >= 8, got {cfg.data.image_size}")
        info = check_idx(cfg.data.path, cfg.data.image_size)
        return {k: info[k] for k in ("image_size", "num_train", "num_test", "num_classes")} | dict(
            num_pretrain=info["num_train"]
        )
    s = build_source(cfg)  # array sources are memory-mapped/lazy: this reads headers only
    return dict(
        image_size=s.image_size,
        num_pretrain=len(s.pretrain),
        num_train=len(s.train),
        num_test=len(s.test),
        num_classes=s.num_classes,
    )


def build_source(cfg) -> Source:
    _check_path(cfg)
    if cfg.data.source in ("folder", "idx") and cfg.data.image_size is not None and cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size: must be >= 8, got {cfg.data.image_size}")
    return SOURCES.get(cfg.data.source)(cfg)
