"""Validate a dataset before training: every bad file is named with its reason.

    python -m fastssl.data.check PATH [--source auto|folder|stl10|cifar10|cifar100] [--no-cache]

Array formats (STL-10 binaries, CIFAR pickles) are checked for sizes, shapes and label ranges
(the same checks the sources run).  Image folders are checked file by file: every
.jpg/.jpeg/.png file is fully decoded (PIL; it fails on the same truncated or corrupt files as
DALI's decoder), so a truncated JPEG, a PNG cut short, an empty file or a text file named
.jpg is reported; grayscale, CMYK, palette, alpha and 16-bit images are valid (the pipelines
convert them to RGB) and are counted as such; files of other types are listed as ignored.

Training runs the same check on folder sources before its first step and leaves bad files
out (their count is printed; the run refuses to start when no usable image is left), so a
bad file never stops an epoch half way.  Results are cached per folder (file names, sizes and
modification times) in ``~/.cache/fastssl`` (``FASTSSL_CACHE`` to move it), so a re-run only
decodes new or changed files.  Exit status: 0 when every image is usable, 1 when some are bad,
2 when nothing usable is left or the path is not a dataset.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from fastssl.data.sources import _CIFAR, IMAGE_EXTS

CONVERTED = {"L": "grayscale", "LA": "grayscale + alpha", "CMYK": "CMYK", "P": "palette", "RGBA": "RGB + alpha",
             "I;16": "16-bit grayscale", "I": "32-bit grayscale", "1": "1-bit"}


def check_image(path: str) -> Tuple[str, str]:
    """('ok' | 'converted' | 'bad', detail) for one image file, by decoding it completely."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "bad", "empty file"
        with Image.open(path) as im:
            im.load()
            mode = im.mode
    except UnidentifiedImageError:
        return "bad", "not an image (unrecognised content)"
    except (OSError, SyntaxError, ValueError) as e:
        return "bad", f"corrupt or truncated ({str(e).splitlines()[0][:120]})"
    if mode == "RGB":
        return "ok", ""
    return "converted", f"{CONVERTED.get(mode, mode)} -> RGB"


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
        out = [f"{self.root}: {self.usable} usable images ({len(self.converted)} converted to RGB), "
               f"{len(self.bad)} bad, {len(self.ignored)} other files ignored"]
        for f, why in list(self.bad.items())[:limit]:
            out.append(f"  bad: {f}: {why}")
        if len(self.bad) > limit:
            out.append(f"  ... and {len(self.bad) - limit} more bad files")
        kinds: Dict[str, int] = {}
        for why in self.converted.values():
            kinds[why] = kinds.get(why, 0) + 1
        out += [f"  converted: {n} x {k}" for k, n in sorted(kinds.items())]
        return out


def _cache_file(root: str) -> str:
    base = os.environ.get("FASTSSL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastssl"))
    return os.path.join(base, "check-" + hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16] + ".json")


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_files(files: List[str], root: str, use_cache: bool = True, progress: bool = True) -> Dict[str, Tuple[str, str]]:
    """Verdict of every file, decoding only those not in the cache (in parallel threads)."""
    cache_path = _cache_file(root)
    cache: Dict[str, list] = {}
    if use_cache and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    out, todo = {}, []
    for f in files:
        c = cache.get(f)
        try:
            stamp = _stamp(f)
        except OSError as e:
            out[f] = ("bad", f"unreadable ({e.strerror})")
            continue
        if c and c[0] == stamp:
            out[f] = (c[1], c[2])
        else:
            todo.append((f, stamp))
    if todo:
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            results = pool.map(check_image, [f for f, _ in todo])
            it = tqdm(results, total=len(todo), desc=f"checking {len(todo)} images", unit="img",
                      disable=not (progress and len(todo) > 200), file=sys.stderr)
            for (f, stamp), verdict in zip(todo, it):
                out[f] = verdict
                cache[f] = [stamp, *verdict]
        if use_cache:
            try:
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                tmp = cache_path + f".{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    json.dump(cache, fh)
                os.replace(tmp, cache_path)
            except OSError:
                pass  # a read-only home: the check simply runs again next time
    return out


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
    for name, (sub, train_files, *_rest) in _CIFAR.items():
        if os.path.isfile(os.path.join(path, train_files[0])) or os.path.isfile(os.path.join(path, sub, train_files[0])):
            return name
    return "folder"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.data.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--source", default="auto", choices=("auto", "folder", "stl10", "cifar10", "cifar100"))
    p.add_argument("--no-cache", action="store_true", help="decode every file again")
    a = p.parse_args(argv)
    if not os.path.isdir(a.path):
        print(f"fastssl.data.check: {a.path}: not a directory", file=sys.stderr)
        return 2
    src = detect_source(a.path) if a.source == "auto" else a.source
    if src != "folder":
        from omegaconf import OmegaConf

        from fastssl.config import ConfigError
        from fastssl.data.sources import build_source

        try:
            s = build_source(OmegaConf.create({"data": {"source": src, "path": a.path, "split": "pretrain",
                                                        "image_size": None}}))
        except ConfigError as e:
            print(f"fastssl.data.check: {src}: {e}", file=sys.stderr)
            return 2
        print(f"{a.path}: {src}: {len(s.pretrain)} pre-training, {len(s.train)} train, {len(s.test)} test images; "
              f"files, shapes and labels valid")
        return 0
    rep = check_folder(a.path, use_cache=not a.no_cache)
    print("\n".join(rep.lines()))
    if rep.usable == 0:
        print(f"fastssl.data.check: no usable image under {a.path}", file=sys.stderr)
        return 2
    return 1 if rep.bad else 0


if __name__ == "__main__":
    sys.exit(main())
