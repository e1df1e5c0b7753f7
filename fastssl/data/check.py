"""Validate a dataset before training: every bad file is named with its reason.

    python -m fastssl.data.check PATH [--source auto|folder|stl10|cifar10|cifar100|idx] [--no-cache]

Array formats (STL-10 binaries, CIFAR pickles, the MNIST family's IDX files, gzipped or not) are
checked for sizes, shapes and label ranges (the same checks the sources run; IDX: magic numbers,
header dimensions against the file's length, image and label counts, test labels within the
train labels' range, each problem named in one line before any pixel is read).  Image folders are checked file by file: every
.jpg/.jpeg/.png file is fully decoded (PIL; it fails on the same truncated or corrupt files as
DALI's decoder), so a truncated JPEG, a PNG cut short, an empty file or a text file named
.jpg is reported; grayscale, CMYK, palette, alpha and 16-bit images are valid (the pipelines
convert them to RGB) and are counted as such; files of other types are listed as ignored.

Training runs the same check on folder sources before its first step and leaves bad files
out (their count is printed; the run refuses to start when no usable image is left), so a
bad file never stops an epoch half way; it also records each image's size, from which the view
plan draws crops over the whole image before anything is decoded.  One check per run: the
process reuses its verdicts for validation, training and evaluation, and under torchrun local
rank 0 checks while the other ranks wait for and read its result.  Results are cached per
folder (file names, sizes and modification times, as compact arrays) in ``~/.cache/fastssl``
(``FASTSSL_CACHE`` to move it), so an unchanged folder costs one stat per file and a re-run
only decodes new or changed files.  Exit status: 0 when every image is usable, 1 when some are bad,
2 when nothing usable is left or the path is not a dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from fastssl.data.sources import _CIFAR, IDX_SETS, IMAGE_EXTS
from fastssl.log import get_logger

log = get_logger(__name__)

CONVERTED = {
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "CMYK": "CMYK",
    "P": "palette",
    "RGBA": "RGB + alpha",
    "I;16": "16-bit grayscale",
    "I": "32-bit grayscale",
    "1": "1-bit",
}


def check_image(path: str) -> Tuple[str, str, int, int]:
    """('ok' | 'converted' | 'bad', detail, height, width) for one image file, by decoding it
    completely (the size is PIL's: the stored pixels, EXIF orientation not applied, as the
    pipelines decode it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "bad", "empty file", 0, 0
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
    except UnidentifiedImageError:
        return "bad", "not an image (unrecognised content)", 0, 0
    except (OSError, SyntaxError, ValueError) as e:
        return "bad", f"corrupt or truncated ({str(e).splitlines()[0][:120]})", 0, 0
    if mode == "RGB":
        return "ok", "", h, w
    return "converted", f"{CONVERTED.get(mode, mode)} -> RGB", h, w


@dataclass
class Report:
    root: str
    ok: List[str] = field(default_factory=list)
    converted: Dict[str, str] = field(default_factory=dict)
    bad: Dict[str, str] = field(default_factory=dict)
    ignored: List[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return len(self.ok) + len(self.converted)

    def lines(self, limit: int = 50) -> List[str]:
        out = [
            f"{self.root}: {self.usable} usable images ({len(self.converted)} converted to RGB), "
            f"{len(self.bad)} bad, {len(self.ignored)} other files ignored"
        ]
        for f, why in list(self.bad.items())[:limit]:
            out.append(f"  bad: {f}: {why}")
        if len(self.bad) > limit:
            out.append(f"  ... and {len(self.bad) - limit} more bad files")
        kinds: Dict[str, int] = {}
        for why in self.converted.values():
            kinds[why] = kinds.get(why, 0) + 1
        out += [f"  converted: {n} x {k}" for k, n in sorted(kinds.items())]
        return out


CODES = ("ok", "converted", "bad")


@dataclass
class Verdicts:
    """The check of a list of files: a verdict code (index into CODES), the image size and, for
    converted and bad files, the reason; arrays, so that 1.28M files stay small."""

    files: List[str]
    code: np.ndarray  # (n,) uint8
    hw: np.ndarray  # (n, 2) int32 height, width (0, 0 for bad files)
    why: Dict[int, str]  # file index -> reason (converted and bad files)
    decoded: int = 0  # files this check decoded (the others came from the cache)
    seconds: float = 0.0

    def verdict(self, i: int) -> Tuple[str, str]:
        return CODES[self.code[i]], self.why.get(i, "")

    def items(self):
        """(file, (verdict, reason)) pairs, in file order."""
        return ((f, self.verdict(i)) for i, f in enumerate(self.files))

    @property
    def bad(self) -> Dict[str, str]:
        return {self.files[i]: self.why[i] for i in np.flatnonzero(self.code == 2)}


def _cache_file(root: str) -> str:
    base = os.environ.get("FASTSSL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastssl"))
    return os.path.join(base, "check-" + hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16] + ".npz")


def _stamps(files: List[str], progress: bool) -> Tuple[np.ndarray, Dict[int, str]]:
    """(n, 2) int64 size and mtime (ns) of every file (-1 where it cannot be read), and the
    reasons of those; the one pass over the folder an unchanged, cached folder costs."""
    from tqdm import tqdm

    out = np.full((len(files), 2), -1, np.int64)
    unreadable = {}
    it = tqdm(
        files,
        desc="listing images",
        unit="file",
        disable=not (progress and len(files) > 100_000 and sys.stderr.isatty()),  # (no bars in log files)
        file=sys.stderr,
        mininterval=1.0,
    )
    for i, f in enumerate(it):
        try:
            st = os.stat(f)
        except OSError as e:
            unreadable[i] = f"unreadable ({e.strerror})"
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out, unreadable


def _names(files: List[str]) -> np.ndarray:
    return np.frombuffer("\n".join(files).encode("utf-8", "surrogateescape"), np.uint8)


def _read_cache(path: str):
    """(names, stamps, code, hw, why) of a cache file, or None when absent or unreadable."""
    try:
        with np.load(path) as z:
            return (
                z["names"],
                z["stamps"],
                z["code"],
                z["hw"],
                {int(k): v for k, v in json.loads(bytes(z["why"]).decode()).items()},
            )
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: str, names, stamps, v: "Verdicts") -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp.npz"
        why = np.frombuffer(json.dumps({str(k): s for k, s in v.why.items()}).encode(), np.uint8)
        np.savez(tmp, names=names, stamps=stamps, code=v.code, hw=v.hw, why=why)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError:
        pass  # a read-only cache folder: the check simply runs again next time


def _local_rank() -> Tuple[int, int]:
    """(this process's rank on its node, processes on the node) as torchrun sets them."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _wait_for_cache(path: str, names, stamps, root: str):
    """A non-zero local rank waits for local rank 0's verdicts of exactly these files."""
    wait = float(os.environ.get("FASTSSL_CHECK_WAIT", 3600))
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < wait:
        c = _read_cache(path)
        if c is not None and np.array_equal(c[0], names) and np.array_equal(c[1], stamps):
            return c
        if time.monotonic() - last > 30:
            last = time.monotonic()
            log.info(
                f"fastssl: data check: waiting for local rank 0's check of {root} ({last - t0:.0f} s)",
                extra={"every_rank": True},
            )
        time.sleep(0.2)
    log.warning(
        f"fastssl: data check: no verdicts from local rank 0 after {wait:.0f} s (FASTSSL_CHECK_WAIT); "
        f"checking {root} here",
        extra={"every_rank": True},
    )
    return None


_MEMO: Dict[Tuple[str, bytes], Verdicts] = {}  # this process's checks (files + stamps): one per run


def check_files(files: List[str], root: str, use_cache: bool = True, progress: bool = True) -> Verdicts:
    """Verdict and size of every file.  One check per run: this process reuses its own result
    (validation, training and evaluation share it); under torchrun only local rank 0 decodes and
    the other ranks read its cache; an unchanged folder costs one stat per file (no decoding);
    only new or changed files are decoded (in parallel threads, with a progress bar)."""
    t0 = time.perf_counter()
    names = _names(files)
    stamps, unreadable = _stamps(files, progress)
    key = (os.path.abspath(root), hashlib.sha1(names.tobytes() + stamps.tobytes()).digest())
    if use_cache and key in _MEMO:
        return _MEMO[key]
    path = _cache_file(root)
    rank, local_world = _local_rank()
    cache = None
    if use_cache:
        cache = _wait_for_cache(path, names, stamps, root) if rank > 0 and local_world > 1 else _read_cache(path)
    n = len(files)
    code, hw, why = np.zeros(n, np.uint8), np.zeros((n, 2), np.int32), {}
    if cache is not None and np.array_equal(cache[0], names) and np.array_equal(cache[1], stamps):
        todo = np.zeros(n, bool)  # the whole folder as it was: every verdict from the cache
        code[:], hw[:], why = cache[2], cache[3], dict(cache[4])
    else:
        todo = np.ones(n, bool)
        if cache is not None:  # an earlier version of the folder: reuse the files that did not change
            old = bytes(cache[0]).decode("utf-8", "surrogateescape").split("\n") if len(cache[0]) else []
            row = {f: i for i, f in enumerate(old)}
            for i, f in enumerate(files):
                j = row.get(f)
                if j is not None and (cache[1][j] == stamps[i]).all():
                    todo[i], code[i], hw[i] = False, cache[2][j], cache[3][j]
                    if j in cache[4]:
                        why[i] = cache[4][j]
    for i, reason in unreadable.items():
        todo[i], code[i], why[i] = False, 2, reason
    idx = np.flatnonzero(todo)
    if len(idx):
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            results = pool.map(check_image, [files[i] for i in idx])
            it = tqdm(
                results,
                total=len(idx),
                desc=f"checking {len(idx)} images",
                unit="img",
                disable=not (progress and len(idx) > 200 and sys.stderr.isatty()),
                file=sys.stderr,
            )
            for i, (verdict, reason, h, w) in zip(idx, it):
                code[i], hw[i] = CODES.index(verdict), (h, w)
                if reason:
                    why[int(i)] = reason
    v = Verdicts(list(files), code, hw, why, decoded=len(idx), seconds=time.perf_counter() - t0)
    if use_cache and (len(idx) or cache is None) and rank == 0:
        _write_cache(path, names, stamps, v)
    if len(idx) and progress:
        log.info(
            f"fastssl: data check: {root}: decoded {len(idx)} of {n} images in {v.seconds:.1f} s "
            f"({int((v.code == 2).sum())} bad); verdicts cached in {path}",
            extra={"every_rank": True},
        )
    if use_cache:
        _MEMO[key] = v
    return v


def check_folder(root: str, use_cache: bool = True, progress: bool = True) -> Report:
    """Every file under ``root`` (recursively): images decoded, others ignored."""
    rep = Report(root)
    images = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for nm in sorted(names):
            p = os.path.join(dirpath, nm)
            if nm.startswith("."):
                continue
            (images if nm.lower().endswith(IMAGE_EXTS) else rep.ignored).append(p)
    for f, (verdict, why) in check_files(images, root, use_cache, progress).items():
        if verdict == "ok":
            rep.ok.append(f)
        elif verdict == "converted":
            rep.converted[f] = why
        else:
            rep.bad[f] = why
    return rep


def detect_source(path: str) -> str:
    for d in (path, os.path.join(path, "stl10_binary")):
        if os.path.isfile(os.path.join(d, "train_X.bin")):
            return "stl10"
    names = os.listdir(path) if os.path.isdir(path) else []
    if any(f.endswith((IDX_SETS["train"][0], IDX_SETS["train"][0] + ".gz")) for f in names):
        return "idx"
    for name, (sub, train_files, *_rest) in _CIFAR.items():
        if os.path.isfile(os.path.join(path, train_files[0])) or os.path.isfile(
            os.path.join(path, sub, train_files[0])
        ):
            return name
    return "folder"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.data.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path")
    p.add_argument("--source", default="auto", choices=("auto", "folder", "stl10", "cifar10", "cifar100", "idx"))
    p.add_argument("--no-cache", action="store_true", help="decode every file again")
    a = p.parse_args(argv)
    if not os.path.isdir(a.path):
        print(f"fastssl.data.check: {a.path}: not a directory", file=sys.stderr)
        return 2
    src = detect_source(a.path) if a.source == "auto" else a.source
    if src != "folder":
        from omegaconf import OmegaConf

        from fastssl.data.sources import build_source
        from fastssl.errors import ConfigError

        try:
            s = build_source(
                OmegaConf.create({"data": {"source": src, "path": a.path, "split": "pretrain", "image_size": None}})
            )
        except ConfigError as e:
            print(f"fastssl.data.check: {src}: {e}", file=sys.stderr)
            return 2
        print(
            f"{a.path}: {src}: {len(s.pretrain)} pre-training, {len(s.train)} train, {len(s.test)} test images; "
            f"files, shapes and labels valid"
        )
        if src == "idx":  # what the set is, as training will see it
            from fastssl.data.sources import check_idx

            info = check_idx(a.path, None)
            (rows, cols), counts = info["native"], np.bincount(s.train.labels, minlength=s.num_classes)
            fit = "zero-padded" if s.image_size >= max(rows, cols) else "resized"
            print(f"  {s.num_classes} classes, {counts.min()}..{counts.max()} train images per class")
            print(f"  {rows}x{cols} px grey, replicated to RGB and {fit} to {s.image_size} px (data.image_size)")
            for split, (im, lb) in info["files"].items():
                print(f"  {split}: {im} + {os.path.basename(lb)}")
        return 0
    rep = check_folder(a.path, use_cache=not a.no_cache)
    print("\n".join(rep.lines()))
    if rep.usable == 0:
        print(f"fastssl.data.check: no usable image under {a.path}", file=sys.stderr)
        return 2
    print(folder_layout(a.path))
    return 1 if rep.bad else 0


def folder_layout(root: str) -> str:
    """How training reads the folder (data.source=folder): its classes and splits, in one line."""
    from omegaconf import OmegaConf

    from fastssl.data.sources import _list_images, build_source
    from fastssl.errors import ConfigError

    cfg = {"data": {"source": "folder", "path": root, "split": "pretrain", "image_size": None}}
    try:
        s = build_source(OmegaConf.create(cfg))  # (the check above is cached: nothing is decoded again)
    except ConfigError as e:
        return f"{root}: training cannot read it: {e}"
    has_splits = os.path.isdir(os.path.join(root, "train"))
    classes = _list_images(os.path.join(root, "train") if has_splits else root)[2]
    test = next((n for n in ("val", "test") if has_splits and os.path.isdir(os.path.join(root, n))), None)
    what = (
        f"{len(classes)} classes ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''})"
        if classes
        else "no class folders (unlabeled: the kNN monitor and evaluation need labels)"
    )
    splits = (
        f"splits train {len(s.train)}"
        + (f", {test} {len(s.test)}" if test else ", no val/ or test/")
        + f", unlabeled {len(s.pretrain) - len(s.train)}"
        if has_splits
        else f"one split ({len(s.train)} images; no train/ sub-folder)"
    )
    return f"{root}: as training reads it: {what}; {splits}; pre-training sees {len(s.pretrain)} images"


if __name__ == "__main__":
    sys.exit(main())
