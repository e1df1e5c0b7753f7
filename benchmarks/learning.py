"""Learning on real images: each method's paper recipe at a CPU size, evaluated by the paper's own
protocol next to the same network at random init, with the kNN monitor per epoch.

    python -m benchmarks.learning [--tiny] [--methods sc exemplar layerwise invp splitbrain]
        [--recipe paper|fmnist] [--epochs N] [--images N] [--test N] [--out DIR] [--work DIR]
        [--docs docs/learning.md] [--render]

Data (no download):

* Fashion-MNIST (Zalando's 28x28 grey product photos, 10 classes), the IDX files of Debian's
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``: /usr/share/datasets/
  fashion-mnist, or ``--fmnist DIR``): the first ``--images`` training and the first ``--test``
  test images are written as IDX files into the work folder and read by ``data.source=idx``
  (28 px zero-padded to 32 px, grey replicated to RGB).  Every method but Split-Brain.
* Split-Brain predicts colour from lightness and back, so it needs colour: ``photos``, crops of
  the colour photographs bundled with scikit-image (astronaut, chelsea, coffee, rocket,
  stereo_motorcycle's left view, hubble_deep_field, retina, immunohistochemistry) and scikit-learn (china,
  flower), 10 photos, one class each ("which photo is this crop from").  Each crop is a random
  square of 48-128 px resized to 32 px; training crops come from the left 70% of each photo and
  test crops from the right 30%, so no test pixel was seen in training.  Written as a PNG folder
  (``train/<photo>/``, ``val/<photo>/``) and read by ``data.source=folder``.

Each method (``RECIPES``) starts from the config of its paper's recipe (its views, loss and
optimiser) and is shrunk to a CPU size (a small backbone, ``--images`` images, ``--epochs``
epochs; schedules scaled to the length); ``--recipe fmnist`` runs each method's named config for
these images instead (``configs/<method>/fmnist.yaml``, ``configs/splitbrain/photos.yaml``).  It
trains with ``fastssl/train.py`` (a subprocess, as a user runs it; the kNN monitor on, with its
random-init level measured before step 0), then evaluates the last checkpoint and the same
network at random init (``--random-init``'s network) by the paper's protocol(s) with
``fastssl.eval``'s own functions.  Results: ``<out>/learning/<recipe>-<method>.json`` per run
(the eval results, the monitor curve, the commands), ``<out>/learning.{json,md,png}`` for all of
them, and the marked block of ``--docs`` (a table and the curves' plot, ``learning.png`` beside
it).  ``--render`` rebuilds the tables, plot and docs from the JSON files already there (runs of
several processes, one method each, land in one folder).  ``--tiny`` runs everything on 512
images for 2 epochs with short protocols (CI: about a minute per method on two CPU cores).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, device_name, environment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
BEGIN, END = "<!-- learning:begin (python -m benchmarks.learning writes this block) -->", "<!-- learning:end -->"

# (module, function) of the colour photos: scikit-image's and scikit-learn's bundled files
PHOTOS = [
    ("skimage.data", "astronaut"),
    ("skimage.data", "chelsea"),
    ("skimage.data", "coffee"),
    ("skimage.data", "rocket"),
    ("skimage.data", "stereo_motorcycle"),
    ("skimage.data", "hubble_deep_field"),
    ("skimage.data", "retina"),
    ("skimage.data", "immunohistochemistry"),
    ("sklearn.datasets", "china.jpg"),
    ("sklearn.datasets", "flower.jpg"),
]


@dataclass
class Recipe:
    """One method's run: the config it starts from, the CPU-size overrides, its protocols."""

    config: str  # the paper-recipe config this run starts from
    data: str  # fmnist | photos
    overrides: List[str]  # the CPU size (backbone, batch, schedule scaled to the epochs)
    protocols: List[tuple]  # (label, protocol, eval overrides)
    what: str  # one line: the recipe at this size
    tiny: List[str] = field(default_factory=list)  # extra overrides under --tiny
    tiny_protocols: Dict[str, List[str]] = field(default_factory=dict)  # label -> overrides under --tiny


def scaled(epochs: int, marks, total: int) -> List[int]:
    """Epoch milestones of a ``total``-epoch schedule scaled to ``epochs`` (each in 1..epochs; one
    per mark, so that per-milestone factors keep their order)."""
    return [max(1, min(epochs, round(m * epochs / total))) for m in marks]


def recipes(epochs: int, recipe: str = "paper") -> Dict[str, Recipe]:
    """The runs, at ``epochs`` epochs.  ``paper``: the papers' recipes (their configs, shrunk);
    ``fmnist``: the named configs that learn on these images (configs/<method>/fmnist.yaml)."""
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    probes = [(f"linear {a}", "linear", [f"eval.layer={a}", "eval.linear_seeds=1"]) for a in layers]
    tiny_probes = {f"linear {a}": ["eval.linear_epochs=3"] for a in layers}
    if recipe == "fmnist":
        cfg = {m: f"configs/{m}/fmnist.yaml" for m in ("sc", "exemplar", "layerwise", "invp")}
        cfg["splitbrain"] = "configs/splitbrain/photos.yaml"
        over = {m: [] for m in cfg}
    else:
        cfg = {
            "sc": "configs/sc/cifar10.yaml",
            "exemplar": "configs/exemplar/stl10.yaml",
            "layerwise": "configs/layerwise/cifar100.yaml",
            "invp": "configs/invp/cifar10.yaml",
            "splitbrain": "configs/splitbrain/cifar10.yaml",
        }
        ex_ms = ",".join(map(str, scaled(epochs, [75, 85, 92, 100], 110)))
        inv_ms = ",".join(map(str, scaled(epochs, [400, 600, 700], 800)))
        over = {
            # the paper's views (two random patches, no flip, no colour change), loss and SGD;
            # ResNet-18 -> the 3-stage convnet of width 32; batch 256 -> 128 (lr scaled with it)
            "sc": ["model.arch=convnet", "model.width=32", "data.batch_size=128", "optim.warmup_epochs=1"],
            # the paper's surrogate task (its transformations, lr, L2, dropout, schedule's factors);
            # 16,000 classes x 100 patches, width 64 -> 256 x 24, width 16; milestones scaled
            "exemplar": [
                "method.num_classes=256",
                "method.patches_per_class=24",
                "method.val_patches_per_class=4",
                "model.width=16",
                f"optim.milestones=[{ex_ms}]",
            ],
            # as configured (one 6x6 layer of 64 filters, cosine triplets, Adam 1e-3, batch 512)
            "layerwise": [],
            # the paper's loss and views (InstDisc's CIFAR views, tau 0.07, 4096 negatives, P 20,
            # lam 0.6); ResNet-18 -> convnet 32; the 800-epoch schedule scaled: ramp-up and
            # milestones at the same fractions
            "invp": [
                "model.arch=convnet",
                "model.width=32",
                f"method.rampup_epoch={max(1, round(30 * epochs / 800))}",
                f"optim.milestones=[{inv_ms}]",
            ],
            # the seed's Lab split, 10 x 10 ab and 100 L bins, 4 x 4 targets; width 128 -> 32
            "splitbrain": ["model.width=32"],
        }
    knn = ("knn", "knn", [])
    return {
        "sc": Recipe(
            cfg["sc"],
            "fmnist",
            over["sc"],
            # the paper's protocol: fine-tuning with few labels (CIFAR-10: 4,000 of 50,000; here 500)
            [("finetune 500 labels", "finetune", ["eval.finetune_labels=500", "eval.finetune_epochs=30"]), knn],
            "Spatial Contrasting",
            tiny=["model.width=8"],
            tiny_protocols={"finetune 500 labels": ["eval.finetune_labels=100", "eval.finetune_epochs=2"]},
        ),
        "exemplar": Recipe(
            cfg["exemplar"],
            "fmnist",
            over["exemplar"],
            [("svm-folds", "svm-folds", ["eval.svm_folds=4", "eval.svm_fold_size=1000"])],
            "Exemplar-CNN",
            tiny=["method.num_classes=32", "method.patches_per_class=8", "method.val_patches_per_class=2"],
            tiny_protocols={"svm-folds": ["eval.svm_folds=2", "eval.svm_fold_size=100"]},
        ),
        "layerwise": Recipe(
            cfg["layerwise"],
            "fmnist",
            over["layerwise"],
            [
                ("transfer, fine-tuned", "transfer", ["eval.transfer_epochs=15", "eval.transfer_freeze=false"]),
                ("transfer, frozen", "transfer", ["eval.transfer_epochs=15", "eval.transfer_freeze=true"]),
            ],
            "layer-wise contrastive",
            tiny=["model.width=16"],
            tiny_protocols={
                "transfer, fine-tuned": ["eval.transfer_epochs=2", "eval.transfer_runs=1"],
                "transfer, frozen": ["eval.transfer_epochs=2", "eval.transfer_runs=1"],
            },
        ),
        "invp": Recipe(
            cfg["invp"],
            "fmnist",
            over["invp"],
            [knn, ("linear", "linear", ["eval.linear_seeds=1"])],
            "Invariance Propagation",
            tiny=["model.width=8", "method.background=256"],
            tiny_protocols={"linear": ["eval.linear_epochs=3"]},
        ),
        "splitbrain": Recipe(
            cfg["splitbrain"],
            "photos",
            over["splitbrain"],
            probes,
            "Split-Brain",
            tiny=["model.width=8"],
            tiny_protocols=tiny_probes,
        ),
    }


# --------------------------------------------------------------------------- data


def write_idx(path: str, a: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (magic 0x0803 images, 0x0801 labels)."""
    a = np.ascontiguousarray(a, np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes())


def fmnist_subset(src: str, out: str, n_train: int, n_test: int) -> str:
    """The first ``n_train`` / ``n_test`` images of the IDX set in ``src`` as IDX files in ``out``."""
    from fastssl.data.sources import idx_files, read_idx

    if os.path.isdir(out):
        return out
    tmp = out + f".part{os.getpid()}"  # (several processes may prepare the same set at once)
    os.makedirs(tmp, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for f, ndim in zip(idx_files(src)[split], (3, 1)):
            a = read_idx(f, ndim)
            if len(a) < n:
                raise SystemExit(f"benchmarks.learning: {f} holds {len(a)} images, fewer than the {n} asked for")
            name = os.path.basename(f)
            write_idx(os.path.join(tmp, name[:-3] if name.endswith(".gz") else name), a[:n])
    _publish(tmp, out)
    return out


def _publish(tmp: str, out: str) -> None:
    """Move a finished folder into place (another process may have got there first)."""
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_photo(module: str, name: str) -> np.ndarray:
    if module == "sklearn.datasets":
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    img = getattr(skimage.data, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)


def photo_crops(out: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Colour crops of the bundled photos, one class per photo (see the module docstring)."""
    from PIL import Image

    if os.path.isdir(os.path.join(out, "val")):
        return out
    rng = np.random.default_rng(seed)
    tmp = out + f".part{os.getpid()}"
    for module, name in PHOTOS:
        img = load_photo(module, name)[..., :3]
        h, w = img.shape[:2]
        cut = int(0.7 * w)
        label = name.split(".")[0]
        for split, n, (x0, x1) in (("train", n_train, (0, cut)), ("val", n_test, (cut, w))):
            d = os.path.join(tmp, split, label)
            os.makedirs(d, exist_ok=True)
            for i in range(n // len(PHOTOS)):
                side = int(rng.integers(48, min(129, h, x1 - x0) + 1))
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(x0, x1 - side + 1))
                crop = Image.fromarray(np.ascontiguousarray(img[y : y + side, x : x + side]))
                crop.resize((32, 32), Image.BILINEAR).save(os.path.join(d, f"{i:05d}.png"))
    _publish(tmp, out)
    return out


# --------------------------------------------------------------------------- one method


def epoch_records(run_dir: str) -> List[dict]:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "knn_monitor" in r or "knn_monitor_init" in r:
                rows.append(r)
    return rows


def run_overrides(rec: Recipe, data: str, epochs: int, run_dir: str, tiny: bool = False) -> List[str]:
    """The command-line overrides of a run: the data, the length, the bookkeeping, the CPU size."""
    common = [
        f"data.source={'idx' if rec.data == 'fmnist' else 'folder'}",
        f"data.path={data}",
        "data.image_size=32",
        "data.num_workers=1",
        f"train.epochs={epochs}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.monitor_every=1",
        "train.ckpt_every_steps=100000",
        f"out_dir={run_dir}",
    ]
    overrides = common + rec.overrides + (rec.tiny if tiny else [])
    if tiny:
        overrides += ["train.log_every_steps=1", "train.monitor_bank=256", "train.monitor_test=256"]
    return overrides


def run_method(method: str, rec: Recipe, a, data_dirs: Dict[str, str], out: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    from fastssl.config import load_config
    from fastssl.engine import checkpoint as ckpt
    from fastssl.eval.__main__ import evaluate

    run_dir = os.path.join(a.work, "runs", f"{a.recipe}-{method}")
    done = os.path.join(out, "learning", f"{a.recipe}-{method}.json")
    if not a.eval_only:
        shutil.rmtree(run_dir, ignore_errors=True)
    data = data_dirs[rec.data]
    overrides = run_overrides(rec, data, a.epochs, run_dir, a.tiny)
    cmd = [sys.executable, os.path.join(ROOT, "fastssl", "train.py"), "--config", rec.config, *overrides]
    os.makedirs(run_dir, exist_ok=True)
    print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
    if a.eval_only:  # the run is there: its training time from the earlier result
        with open(done) as f:
            train_s = json.load(f)["train_seconds"]
    else:
        t0 = time.time()
        with open(os.path.join(a.work, "runs", f"{a.recipe}-{method}.log"), "w") as log:
            p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        train_s = time.time() - t0
        if p.returncode != 0:
            raise SystemExit(f"benchmarks.learning: {method}: training exited {p.returncode} (log: {log.name})")
    state = ckpt.load(os.path.join(run_dir, "checkpoints", "last.pt"))
    base = OmegaConf.to_container(OmegaConf.create(state["config"]), resolve=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evals = []
    for label, protocol, eval_over in rec.protocols:
        extra = list(eval_over) + (rec.tiny_protocols.get(label, []) if a.tiny else [])
        row = {"label": label, "protocol": protocol, "overrides": extra}
        for side, st in (("trained", state), ("random", None)):
            cfg = load_config(OmegaConf.create(base), extra)
            t = time.time()
            res = evaluate(cfg, protocol, st, device, log=lambda m: None)
            row[side] = {k: v for k, v in res.items() if k in ("accuracy", "std", "runs")}
            row[side]["seconds"] = round(time.time() - t, 1)
        print(
            f"   {label}: trained {row['trained']['accuracy']:.2f}%, random init {row['random']['accuracy']:.2f}%",
            flush=True,
        )
        evals.append(row)
    monitor = epoch_records(run_dir)
    cfg = load_config(OmegaConf.create(base))
    result = {
        "method": method,
        "recipe": a.recipe,
        "what": rec.what,
        "config": rec.config,
        "overrides": overrides,
        "command": " ".join(["python fastssl/train.py", "--config", rec.config, *overrides]),
        "data": rec.data,
        "epochs": a.epochs,
        "arch": f"{cfg.model.arch} (width {cfg.model.width})",
        "train_seconds": round(train_s, 1),
        "evals": evals,
        "monitor": monitor,
        "environment": environment(),
        "tiny": a.tiny,
    }
    result["num_train"], result["num_test"] = data_sizes(cfg)
    os.makedirs(os.path.join(out, "learning"), exist_ok=True)
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def data_sizes(cfg) -> tuple:
    from fastssl.data.sources import check_source

    info = check_source(cfg)
    return info["num_train"], info["num_test"]


# --------------------------------------------------------------------------- report

ORDER = ("sc", "exemplar", "layerwise", "invp", "splitbrain")
NAMES = {
    "sc": "Spatial Contrasting",
    "exemplar": "Exemplar-CNN",
    "layerwise": "layer-wise contrastive",
    "invp": "Invariance Propagation",
    "splitbrain": "Split-Brain",
}
DATA = {
    "fmnist": "Fashion-MNIST (first {n} train / {m} test images, 32 px)",
    "photos": "colour photo crops (10 photos, {n} train / {m} test crops, 32 px)",
}


def snapshot(run_dir: str, out: str, epochs: int) -> None:
    """An unfinished run's monitor curve so far, as ``<out>/learning/partial/<recipe>-<method>.json``
    (rendered as "in progress" until the run's own result file exists)."""
    name = os.path.basename(os.path.normpath(run_dir))
    recipe, method = name.split("-", 1)
    rec = {"method": method, "recipe": recipe, "partial": True, "epochs": epochs, "evals": []}
    rec["monitor"] = epoch_records(run_dir)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        rec["config_yaml"] = f.read()
    os.makedirs(os.path.join(out, "learning", "partial"), exist_ok=True)
    with open(os.path.join(out, "learning", "partial", f"{name}.json"), "w") as f:
        json.dump(rec, f, indent=1)


def load_results(out: str) -> List[dict]:
    rows, done = [], set()
    for path in glob.glob(os.path.join(out, "learning", "*.json")):
        with open(path) as f:
            rows.append(json.load(f))
            done.add((rows[-1]["recipe"], rows[-1]["method"]))
    for path in glob.glob(os.path.join(out, "learning", "partial", "*.json")):
        with open(path) as f:
            r = json.load(f)
        if (r["recipe"], r["method"]) not in done:
            rows.append(r)
    key = {m: i for i, m in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (r["recipe"] != "paper", r["recipe"], key.get(r["method"], 99)))


def fmt(e: dict) -> str:
    return f"{e['accuracy']:.1f}" + (f" +- {e['std']:.1f}" if e.get("std") and len(e.get("runs", [])) > 1 else "")


def monitor_summary(r: dict) -> str:
    init = [m["knn_monitor_init"] for m in r["monitor"] if "knn_monitor_init" in m]
    curve = [m["knn_monitor"] for m in r["monitor"] if "knn_monitor" in m]
    if not curve:
        return "-"
    s = f"{curve[-1]:.1f} (best {max(curve):.1f})"
    return s + (f" vs {init[0]:.1f}" if init else "")


def table(rows: List[dict]) -> str:
    lines = [
        "| method | recipe (config) | data | backbone | epochs | protocol | trained | random init | difference "
        "| kNN monitor, last (best) vs random init | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("partial"):
            last = max((m["epoch"] for m in r["monitor"] if "knn_monitor" in m), default=0)
            lines.append(
                f"| {NAMES[r['method']]} | {r['recipe']} (in progress: {last} of {r['epochs']} epochs when this page was "
                f"written) | | | {r['epochs']} | not run yet | | | | {monitor_summary(r)} | |"
            )
            continue
        data = DATA[r["data"]].format(n=r["num_train"], m=r["num_test"])
        for i, e in enumerate(r["evals"]):
            d = e["trained"]["accuracy"] - e["random"]["accuracy"]
            head = (
                [r["what"], f"{r['recipe']} (`{r['config']}`)", data, r["arch"], str(r["epochs"])]
                if i == 0
                else [""] * 5
            )
            tail = [monitor_summary(r), f"{r['train_seconds'] / 60:.0f} min"] if i == 0 else ["", ""]
            lines.append(
                "| " + " | ".join(head + [e["label"], fmt(e["trained"]), fmt(e["random"]), f"{d:+.1f}"] + tail) + " |"
            )
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes_ = sorted({r["recipe"] for r in rows}, key=lambda x: x != "paper")
    fig, axes = plt.subplots(1, len(ORDER), figsize=(3.2 * len(ORDER), 3.2), squeeze=False)
    for j, m in enumerate(ORDER):
        ax = axes[0, j]
        ax.set_title(m, fontsize=10)
        for k, rc in enumerate(recipes_):
            for r in rows:
                if r["method"] != m or r["recipe"] != rc:
                    continue
                curve = [(x["epoch"], x["knn_monitor"]) for x in r["monitor"] if "knn_monitor" in x]
                if "stage" in json.dumps(r["monitor"]) and curve:  # multi-stage: number the epochs through
                    curve = [(i + 1, v) for i, (_, v) in enumerate(curve)]
                init = [x["knn_monitor_init"] for x in r["monitor"] if "knn_monitor_init" in x]
                if curve:
                    lab = f"{rc}: trained" + (" (in progress)" if r.get("partial") else "")
                    ax.plot(*zip(*curve), color=f"C{k}", marker="o", ms=2, lw=1.2, label=lab)
                if init:
                    ax.axhline(init[0], color=f"C{k}", ls="--", lw=1, label=f"{rc}: random init")
        ax.set_xlabel("epoch")
        if j == 0:
            ax.set_ylabel("kNN monitor (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"kNN monitor per epoch: trained (line) vs the same network at random init (dashed), {device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(out: str, docs: str) -> None:
    rows = load_results(out)
    if not rows:
        raise SystemExit(f"benchmarks.learning: no results in {out}/learning/")
    env = next(r["environment"] for r in rows if "environment" in r)
    md = table(rows)
    cmds = "\n".join(  # (paths relative to the checkout)
        f"* {r['recipe']} {r['method']}: `{r['command'].replace(ROOT + os.sep, '')}`" for r in rows if "command" in r
    )
    body = (
        f"Measured on {device_name()} ({env.get('cpu')}, torch {env.get('torch')}, DALI {env.get('nvidia.dali')}), "
        f"by `python -m benchmarks.learning`{' --tiny' if rows[0].get('tiny') else ''}.\n\n{md}\n\n"
        f"![kNN monitor per epoch against its random-init level](learning.png)\n\n"
        f"<details><summary>The training commands</summary>\n\n{cmds}\n\n</details>\n"
    )
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(f"# learning on {device_name()}\n\n{body}")
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(out, "learning.png"))
    if docs:
        d = os.path.dirname(os.path.abspath(docs))
        os.makedirs(d, exist_ok=True)
        if os.path.abspath(d) != os.path.abspath(out):
            shutil.copyfile(os.path.join(out, "learning.png"), os.path.join(d, "learning.png"))
        text = open(docs).read() if os.path.isfile(docs) else "# Learning on real images\n"
        m = re.search(r"<!-- learning:begin[^>]*-->\n.*?<!-- learning:end -->", text, re.S)
        block = BEGIN + "\n" + body + END
        text = text[: m.start()] + block + text[m.end() :] if m else text.rstrip("\n") + "\n\n" + block + "\n"
        with open(docs, "w") as f:
            f.write(text)
        print("docs:", docs)
    print(md)
    print("written to", out)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.learning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="512 images, 2 epochs, short protocols (CI)")
    p.add_argument("--methods", nargs="+", default=list(ORDER), choices=ORDER)
    p.add_argument("--recipe", default="paper", choices=("paper", "fmnist"))
    p.add_argument("--epochs", type=int, default=None, help="default 30 (--tiny: 2)")
    p.add_argument("--images", type=int, default=None, help="training images (default 3000; --tiny: 512)")
    p.add_argument("--test", type=int, default=None, help="test images (default 1000; --tiny: 256)")
    p.add_argument("--fmnist", default=FMNIST, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--work", default=None, help="data subsets and run folders (default runs/learning)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs already in --work again")
    p.add_argument("--docs", default=None, help="markdown file whose marked block gets the table and plot")
    p.add_argument("--render", action="store_true", help="only rebuild the tables, plot and docs from <out>")
    p.add_argument(
        "--partial",
        nargs="*",
        default=[],
        help="run folders still training: record their curves so far (with --render)",
    )
    a = p.parse_args(argv)
    a.epochs = a.epochs or (2 if a.tiny else 30)
    a.images = a.images or (512 if a.tiny else 3000)
    a.test = a.test or (256 if a.tiny else 1000)
    out = a.out or os.path.join(RESULTS, device_name())
    a.work = a.work or os.path.join(ROOT, "runs", "learning" + ("-tiny" if a.tiny else ""))
    docs = a.docs if a.docs is not None else ("" if a.tiny else os.path.join(ROOT, "docs", "learning.md"))
    for d in a.partial:
        snapshot(d, out, a.epochs)
    if a.render:
        render(out, docs)
        return
    if not os.path.isdir(a.fmnist):
        raise SystemExit(
            f"benchmarks.learning: no Fashion-MNIST IDX files in {a.fmnist}: apt-get install dataset-fashion-mnist "
            f"(or --fmnist DIR)"
        )
    tag = f"{a.images}x{a.test}"
    data_dirs = {
        "fmnist": fmnist_subset(a.fmnist, os.path.join(a.work, f"fmnist-{tag}"), a.images, a.test),
        "photos": photo_crops(os.path.join(a.work, f"photos-{tag}"), a.images, a.test),
    }
    recs = recipes(a.epochs, a.recipe)
    for m in a.methods:
        run_method(m, recs[m], a, data_dirs, out)
    render(out, docs)


if __name__ == "__main__":
    main()
