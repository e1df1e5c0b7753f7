"""A run's report: ``RUN_DIR/report.md`` and its pictures in ``RUN_DIR/report/``.

    python -m fastssl.report RUN_DIR [--gallery 2000] [--queries 16] [--neighbours 8]
    fastssl report RUN_DIR

What it shows, all read from the run folder (nothing in it is changed but ``report.md`` and
``report/``):

1. ``training.png``: loss, learning rate, images/s and data-stall against steps (the step
   records of ``metrics.jsonl``; layer-wise stages marked);
2. ``knn_monitor.png``: the per-epoch kNN monitor (``knn_monitor``),
   when the epoch records carry it, with ``knn_monitor_init`` (the untrained network's level,
   measured before step 0) as a dashed line;
3. the evaluation results found in the folder (``eval_<protocol>[_random].json``), trained next
   to random init, as a table;
4. ``retrieval.png``: test images and their nearest training images by cosine similarity of the
   backbone's pooled features of whole images (the method's ``eval_input``), learned features
   beside the same network untrained (built as ``python -m fastssl.eval --random-init`` builds
   it); green border = same label as the query, red = another; the gallery is a seeded subset
   of at most ``--gallery`` training images, so it stays a few seconds on a CPU;
5. ``filters.png``: the backbone's first convolution, each filter contrast-stretched on its
   own, learned beside random init;
6. the resolved ``config.yaml``, in a collapsible block.

A folder that is not a run (no ``config.yaml``, ``metrics.jsonl`` or ``checkpoints/last.pt``)
is refused with one line naming what is missing (exit status 2).  A run whose data has no
labels gets the pictures without borders, and report.md says which parts were skipped.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np

REQUIRED = ("config.yaml", "metrics.jsonl", os.path.join("checkpoints", "last.pt"))
MONITOR_KEYS = ("knn_monitor",)

# retrieval-grid geometry (pixels); tile = image side x scale (see tile_side)
BORDER, GAP, MARGIN, QUERY_GAP, PANEL_GAP, HEADER = 4, 2, 8, 10, 20, 24
GREEN, RED, NEUTRAL, BACKGROUND = (20, 190, 50), (220, 30, 30), (150, 150, 150), (255, 255, 255)


def say(msg: str) -> None:
    print(f"fastssl.report: {msg}", flush=True)


# --------------------------------------------------------------------------- run folder


def missing_parts(run_dir: str) -> List[str]:
    return [p for p in REQUIRED if not os.path.isfile(os.path.join(run_dir, p))]


def read_metrics(path: str) -> Tuple[List[Dict], List[Dict], int]:
    """(step records, epoch records, unreadable lines).  Step records carry ``lr``; the rest
    come from ``log_epoch``.  A resumed run may log a step twice (the steps after its last
    checkpoint are run again): the last record of a step wins."""
    steps, epochs, bad = {}, {}, 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # e.g. the half-written last line of a killed run
                bad += 1
                continue
            if not isinstance(r, dict) or "step" not in r:
                bad += 1
                continue
            if "lr" in r and "loss" in r:
                steps[r["step"]] = r
            else:
                epochs[(r["step"], r.get("epoch"))] = {**epochs.get((r["step"], r.get("epoch")), {}), **r}
    return (
        [steps[k] for k in sorted(steps)],
        [epochs[k] for k in sorted(epochs, key=lambda k: (k[0], k[1] if k[1] is not None else 0))],
        bad,
    )


def read_evals(run_dir: str) -> Dict[str, Dict[str, Dict]]:
    """{protocol: {"trained": result, "random": result}} from ``eval_*.json`` (not ``.partial``)."""
    out: Dict[str, Dict[str, Dict]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval_*.json"))):
        if path.endswith(".partial.json"):
            continue
        try:
            with open(path) as f:
                r = json.load(f)
            acc = float(r["accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            say(f"skipping {os.path.basename(path)}: not an evaluation result")
            continue
        stem = os.path.basename(path)[len("eval_") : -len(".json")]
        random = bool(r.get("random_init", stem.endswith("_random")))
        if stem.endswith("_random"):
            stem = stem[: -len("_random")]
        protocol = r.get("protocol", stem)
        out.setdefault(protocol, {})["random" if random else "trained"] = {
            **r,
            "accuracy": acc,
            "file": os.path.basename(path),
        }
    return out


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(0)}" + (f" x {n}" if n > 1 else "") + f", torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(steps: List[Dict], path: str) -> None:
    plt = _plt()
    x = np.array([r["step"] for r in steps])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    col = lambda k: np.array([r.get(k, np.nan) for r in steps], dtype=float)  # noqa: E731

    ax = axes[0, 0]
    ax.plot(x, col("loss"), color="C0", lw=1.4, label="loss")
    parts = sorted({k for r in steps for k in r if k.startswith("loss_")})
    for i, k in enumerate(parts[:6]):
        if not np.allclose(col(k), col("loss"), equal_nan=True):  # (a single-stage loss_x equals loss)
            ax.plot(x, col(k), lw=0.9, ls="--", color=f"C{i + 1}", label=k)
    ax.set_title("loss")
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    axes[0, 1].plot(x, col("lr"), color="C1")
    axes[0, 1].set_title("learning rate")
    axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[1, 0].plot(x, col("images_per_s"), color="C2")
    axes[1, 0].set_title("images/s (all ranks)")
    axes[1, 0].set_ylim(bottom=0)
    axes[1, 1].plot(x, 100 * col("data_stall"), color="C3")
    axes[1, 1].set_title("data-stall (% of step time waiting for data)")
    axes[1, 1].set_ylim(0, max(5.0, min(100.0, 1.1 * np.nanmax(100 * col("data_stall")))))
    # layer-wise runs: mark where each stage begins
    stage = [r.get("stage") for r in steps]
    bounds = [(x[i], stage[i]) for i in range(1, len(x)) if stage[i] != stage[i - 1] and stage[i] is not None]
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for b, s in bounds:
            ax.axvline(b, color="0.5", ls=":", lw=1)
    for b, s in bounds:
        axes[0, 0].annotate(
            f"stage {s + 1}",
            (b, 1),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            xytext=(3, -12),
            textcoords="offset points",
            color="0.35",
        )
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def number_epochs(epochs: List[Dict]) -> None:
    """Adds ``_stage`` (1-based) and ``_x`` (epochs counted across stages) to the epoch records
    (in step order): a staged run's epoch count starts again at each stage."""
    stage, offset, last = 1, 0.0, 0.0
    for r in epochs:
        e = float(r.get("epoch") or 0)
        if e < last:  # a new stage
            stage, offset = stage + 1, offset + last
        r["_stage"], r["_x"], last = stage, offset + e, e


def plot_monitor(epochs: List[Dict], keys: List[str], path: str, init: Optional[float] = None) -> None:
    """The per-epoch monitors; ``init``: ``knn_monitor_init``, the untrained network's level (a line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, k in enumerate(keys):
        rs = [r for r in epochs if k in r]
        ax.plot([r["_x"] for r in rs], [r[k] for r in rs], marker="o", ms=3, color=f"C{i}", label=k)
    if init is not None:
        ax.axhline(init, color="C0", ls="--", lw=1.2, label=f"knn_monitor at random init (step 0): {init:.1f}%")
    staged = epochs[-1]["_stage"] > 1
    for r0, r1 in zip(epochs, epochs[1:]):
        if r1["_stage"] != r0["_stage"]:
            ax.axvline(r0["_x"] + 0.5, color="0.5", ls=":", lw=1)
            ax.annotate(
                f"stage {r1['_stage']}",
                (r0["_x"] + 0.5, 1),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                xytext=(3, -12),
                textcoords="offset points",
                color="0.35",
            )
    ax.set_xlabel("epoch (all stages)" if staged else "epoch")
    ax.set_ylabel("weighted kNN accuracy (%)")
    ax.set_title("kNN monitor (test images against labeled training images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filter_tiles(w, scale: Optional[int] = None) -> np.ndarray:
    """(out, in, k, k) conv weights -> one (H, W, 3) float image in [0, 1]: each filter
    contrast-stretched on its own (min..max), tiled on a grey grid, upscaled ``scale`` times
    (nearest; default: to about 36 px a tile).  Filters over other than 3 input channels are
    shown one grey tile per channel."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape[1] != 3:
        w = w.reshape(-1, 1, *w.shape[2:]).repeat(3, axis=1)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    w = (w - lo) / np.maximum(hi - lo, 1e-12)
    n, _, k, _ = w.shape
    cols = int(np.ceil(np.sqrt(n)))  # a full rectangle when n has a divisor near its root (32: 8 x 4)
    cols = next((c for c in range(cols, int(2 * np.sqrt(n)) + 1) if n % c == 0), cols)
    rows = int(np.ceil(n / cols))
    scale = scale or max(2, 36 // k)
    t = k * scale
    g = max(2, t // 8)  # grey gap between filters
    grid = np.full((rows * (t + g) + g, cols * (t + g) + g, 3), 0.5, np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = w[i].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        grid[g + r * (t + g) : g + r * (t + g) + t, g + c * (t + g) : g + c * (t + g) + t] = tile
    return grid


def first_conv(backbone):
    import torch.nn as nn

    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None, None


def plot_filters(learned, random, name: str, path: str) -> None:
    plt = _plt()
    a, b = filter_tiles(learned), filter_tiles(random)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.8 + 4.6 * a.shape[0] / a.shape[1]))
    for ax, img, title in ((axes[0], a, "learned"), (axes[1], b, "random init")):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    o, i, k, _ = learned.shape
    fig.suptitle(f"first convolution {name}: {o} filters of {i} x {k} x {k}, each stretched to its own min..max")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- retrieval


def tile_side(image_size: int) -> int:
    """Side of one image in the grid: native size upscaled (nearest) by the integer factor that
    brings it to about 64 px (32 px -> 64, 96 px -> 96); sides above 128 px are shrunk to 128."""
    if image_size > 128:
        return 128
    return image_size * max(1, 64 // image_size)


def grid_size(image_size: int, queries: int, neighbours: int) -> Tuple[int, int]:
    """(width, height) of the retrieval grid in pixels."""
    cell = tile_side(image_size) + 2 * BORDER
    panel = neighbours * cell + (neighbours - 1) * GAP
    width = 2 * MARGIN + cell + QUERY_GAP + 2 * panel + PANEL_GAP
    height = HEADER + MARGIN + queries * cell + (queries - 1) * GAP + MARGIN
    return width, height


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw_grid(
    query_imgs: np.ndarray,
    nn_learned: List[np.ndarray],
    nn_random: List[np.ndarray],
    ok_learned: Optional[np.ndarray],
    ok_random: Optional[np.ndarray],
    titles: Tuple[str, str],
    path: str,
):
    """``query_imgs`` (Q, H, W, 3) uint8; ``nn_*`` (Q, K, H, W, 3) uint8; ``ok_*`` (Q, K) bool or
    None (no labels: neutral borders).  Writes the PNG; returns its (width, height)."""
    from PIL import Image, ImageDraw

    q, k = nn_learned.shape[:2]
    side = query_imgs.shape[1]
    t = tile_side(side)
    cell = t + 2 * BORDER
    W, H = grid_size(side, q, k)
    canvas = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def tile(img: np.ndarray):
        im = Image.fromarray(np.ascontiguousarray(img))
        return im.resize((t, t), Image.NEAREST if t >= side else Image.BOX)

    def put(img, x, y, colour):
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
        canvas.paste(tile(img), (x + BORDER, y + BORDER))

    x_learned = MARGIN + cell + QUERY_GAP
    x_random = x_learned + k * cell + (k - 1) * GAP + PANEL_GAP
    font = _font()
    draw.text((MARGIN, 5), "query", fill=(0, 0, 0), font=font)
    draw.text((x_learned, 5), titles[0], fill=(0, 0, 0), font=font)
    draw.text((x_random, 5), titles[1], fill=(0, 0, 0), font=font)
    for i in range(q):
        y = HEADER + MARGIN + i * (cell + GAP)
        put(query_imgs[i], MARGIN, y, NEUTRAL)
        for x0, imgs, ok in ((x_learned, nn_learned, ok_learned), (x_random, nn_random, ok_random)):
            for j in range(k):
                colour = NEUTRAL if ok is None else (GREEN if ok[i, j] else RED)
                put(imgs[i, j], x0 + j * (cell + GAP), y, colour)
    canvas.save(path)  # (optimize=True: 5% smaller, 2.5 s slower for noisy images)
    return W, H


def pick_queries(labels: Optional[np.ndarray], n_avail: int, q: int, rng: np.random.Generator) -> np.ndarray:
    """``q`` query indices: with labels, classes in turn (so every class shows), else at random."""
    order = rng.permutation(n_avail)
    if labels is None:
        return order[:q]
    by_class: Dict[int, List[int]] = {}
    for i in order:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    picked, classes = [], sorted(by_class)
    while len(picked) < min(q, n_avail):
        for c in classes:
            if by_class[c] and len(picked) < q:
                picked.append(by_class[c].pop())
    return np.array(picked)


def feature_stage(cfg) -> Optional[str]:
    """The stage whose pooled output is compared: ``eval.layer``, or the method's
    ``feature_stage`` (e.g. a layer-wise run's last trained stage, ``layer<method.layers>``: the
    deeper ones stay untrained), or None (the backbone's last stage)."""
    if cfg.eval.layer is not None:
        return cfg.eval.layer
    from fastssl.methods import get_method

    return get_method(cfg.method.name).feature_stage(cfg)


def pick_images(cfg, source, gallery: int, queries: int, neighbours: int) -> SimpleNamespace:
    """The seeded choice of images: the gallery (``gal_idx`` of ``gal_split``), the queries shown
    (``shown``) and those scored for label agreement (``scored``, of ``q_split``), their labels
    (None when either side has none) and ``k``, the neighbours per query."""
    rng = np.random.default_rng([cfg.seed, 4099])  # its own stream
    gal_split = source.train if len(source.train) else source.pretrain
    gal_labels = None if gal_split.labels is None else np.asarray(gal_split.labels)
    n = len(gal_split)
    if len(source.test):
        q_split = source.test
        q_labels = None if source.test.labels is None else np.asarray(source.test.labels)
        gal_idx = np.sort(rng.choice(n, min(n, gallery), replace=False))
        q_pool = np.arange(len(q_split))
    else:  # no test images: queries are training images outside the gallery
        if n < queries + neighbours:
            raise ValueError(f"only {n} images: too few for {queries} queries with {neighbours} neighbours")
        perm = rng.permutation(n)
        q_pool, gal_idx = perm[: max(queries, n - gallery)], np.sort(perm[max(queries, n - gallery) :])
        q_split, q_labels = gal_split, gal_labels
    if gal_labels is None or q_labels is None:
        gal_labels = q_labels = None
    shown = q_pool[pick_queries(None if q_labels is None else q_labels[q_pool], len(q_pool), queries, rng)]
    # label agreement over more queries than the 16 shown (cheap: a few hundred feature rows)
    scored = np.union1d(shown, q_pool[np.sort(rng.permutation(len(q_pool))[:1000])])
    return SimpleNamespace(
        gal_split=gal_split,
        gal_labels=gal_labels,
        gal_idx=gal_idx,
        q_split=q_split,
        q_labels=q_labels,
        shown=shown,
        scored=scored,
        k=min(neighbours, len(gal_idx)),
    )


def search(cfg, state, source, picks: SimpleNamespace, stage: Optional[str], prepare):
    """The backbone (trained: ``state``; untrained: None) and the positions in ``picks.gal_idx`` of
    the ``picks.k`` nearest gallery images of every scored query (cosine of pooled ``stage`` features)."""
    import torch

    from fastssl.eval.__main__ import load_backbone
    from fastssl.features.images import extract

    device = torch.device("cpu")
    bs = min(cfg.eval.batch_size, 256)
    backbone = load_backbone(cfg, state, source, device)

    def feats(split, idx):
        return torch.nn.functional.normalize(
            extract(backbone, split, source, prepare, bs, device, stage, idx).float(), dim=1
        )

    with torch.no_grad():
        g = feats(picks.gal_split, picks.gal_idx)
        qf = feats(picks.q_split, picks.scored)
        nbr = (qf @ g.T).topk(picks.k, dim=1).indices.numpy()
    return backbone, nbr


def retrieval(cfg, state, source, out_png: str, gallery: int, queries: int, neighbours: int) -> Dict:
    """Features of a seeded gallery subset and of the query images by the trained and the
    untrained backbone; the grid PNG; the label agreement of the neighbours."""
    from fastssl.data.decode import split_images
    from fastssl.methods import get_method

    p = pick_images(cfg, source, gallery, queries, neighbours)
    labels = p.gal_labels is not None
    stage = feature_stage(cfg)
    prepare = get_method(cfg.method.name).eval_input(cfg, source)
    result = {"stage": stage, "gallery": len(p.gal_idx), "scored": len(p.scored), "neighbours": p.k}
    row = np.searchsorted(p.scored, p.shown)  # the shown queries among the scored
    nn_imgs, oks = [], []
    for which, st in (("learned", state), ("random", None)):
        backbone, nbr = search(cfg, st, source, p, stage, prepare)
        if result["stage"] is None:
            result["stage"] = backbone.stage_names[-1]
        result["conv_name"], conv = first_conv(backbone)
        result[f"conv_{which}"] = None if conv is None else conv.weight.detach().float().numpy()
        tiles = [split_images(p.gal_split, p.gal_idx[nbr[r]], source.image_size) for r in row]
        nn_imgs.append(np.stack([t.permute(0, 2, 3, 1).numpy() for t in tiles]))
        if labels:
            same = p.gal_labels[p.gal_idx[nbr]] == p.q_labels[p.scored][:, None]
            result[f"agree_{which}"] = float(same.mean() * 100)
            oks.append(same[row])
        else:
            oks.append(None)
    qimg = split_images(p.q_split, p.shown, source.image_size).permute(0, 2, 3, 1).numpy()
    titles = [f"learned features ({cfg.method.name}, {result['stage']})", "random init (the same network untrained)"]
    if labels:
        titles = [f"{t}: {result[f'agree_{w}']:.0f}% same label" for t, w in zip(titles, ("learned", "random"))]
    result["size"] = draw_grid(qimg, nn_imgs[0], nn_imgs[1], oks[0], oks[1], titles, out_png)
    result["labels"] = labels
    if labels:
        result["chance"] = float(np.mean([np.mean(p.gal_labels[p.gal_idx] == y) for y in p.q_labels[p.scored]]) * 100)
    return result


# --------------------------------------------------------------------------- report.md, one function a section


def _fmt_eval(r: Optional[Dict]) -> str:
    if r is None:
        return "-"
    s = f"{r['accuracy']:.2f}%"
    if "std" in r and r.get("runs") and len(r["runs"]) > 1:
        s += f" ± {r['std']:.2f} ({len(r['runs'])} runs)"
    return s


def eval_table(evals: Dict[str, Dict[str, Dict]]) -> List[str]:
    lines = ["| protocol | trained | random init | gain | files |", "|---|---|---|---|---|"]
    for proto in sorted(evals):
        t, r = evals[proto].get("trained"), evals[proto].get("random")
        gain = f"{t['accuracy'] - r['accuracy']:+.2f} points" if t and r else "-"
        files = ", ".join(f"`{x['file']}`" for x in (t, r) if x)
        lines.append(f"| {proto} | {_fmt_eval(t)} | {_fmt_eval(r)} | {gain} | {files} |")
    return lines


def header_section(run_dir: str, ck_path: str, state, cfg) -> List[str]:
    """The title and what was reported on: method, data, checkpoint, machine."""
    from fastssl.methods import get_method

    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(ck_path)).strftime("%Y-%m-%d %H:%M")
    where = (
        f"step {state['step']} (stage {state.get('stage', 0) + 1}, "
        if get_method(cfg.method.name).report_stage
        else f"step {state['step']} ("
    )
    where += f"{state['epoch']} epochs + {state['step_in_epoch']} steps"
    where += ")"
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    return [
        f"# Run report: `{name}`",
        "",
        f"* **method** `{cfg.method.name}`, backbone `{cfg.model.arch}` (width {cfg.model.width}), "
        f"data `{cfg.data.source}`, seed {cfg.seed}",
        f"* **checkpoint** `checkpoints/last.pt`: {where} ({state.get('reason', '?')}; written {mtime})",
        f"* **report made on** {machine()}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
        f"by `python -m fastssl.report {run_dir}`; the throughput below is the training machine's",
    ]


def training_section(steps: List[Dict], bad: int, pics: str) -> List[str]:
    """``training.png`` and a line of last loss, median throughput and data-stall."""
    md = ["", "## Training", ""]
    if steps:
        plot_training(steps, os.path.join(pics, "training.png"))
        say("wrote report/training.png")
        ips = [r["images_per_s"] for r in steps[1:] or steps if "images_per_s" in r]
        stall = [r["data_stall"] for r in steps[1:] or steps if "data_stall" in r]
        last = steps[-1]
        md += [
            "![loss, learning rate, images/s and data-stall against steps](report/training.png)",
            "",
            f"{len(steps)} logged steps ({steps[0]['step']} to {last['step']}); last loss {last['loss']:.4f}"
            + (f"; median {np.median(ips):,.0f} images/s" if ips else "")
            + (f", data-stall {100 * np.median(stall):.1f}%" if stall else "")
            + (" (medians without the first record, which includes start-up)" if len(steps) > 1 else "")
            + (f"; {last['skipped_steps']} non-finite steps skipped" if last.get("skipped_steps") else "")
            + ".",
        ]
    else:
        md.append("metrics.jsonl holds no step records (the run stopped before its first logged step).")
    if bad:
        md += ["", f"({bad} unreadable lines in metrics.jsonl were left out.)"]
    return md


def monitor_lines(mon: List[Dict], keys: List[str], init: Optional[float]) -> List[str]:
    """One line per monitor key (last and best), the random-init level, the monitor's time."""
    md = []
    staged = mon[-1]["_stage"] > 1
    when = lambda r: f"epoch {r['epoch']:g}" + (f" of stage {r['_stage']}" if staged else "")  # noqa: E731
    for k in keys:
        rs = [r for r in mon if k in r]
        best = max(rs, key=lambda r: r[k])
        md.append(
            f"* `{k}`: {rs[-1][k]:.2f}% after {when(rs[-1])} (best {best[k]:.2f}% after {when(best)}; {len(rs)} epochs)"
        )
    if init is not None and "knn_monitor" in keys:
        last = [r for r in mon if "knn_monitor" in r][-1]["knn_monitor"]
        md.append(
            f"* `knn_monitor_init`: {init:.2f}%, the same monitor on the untrained network (before step 0); "
            f"the last epoch is {last - init:+.2f} points from it"
        )
    secs = [r["monitor_s"] for r in mon if "monitor_s" in r]
    if secs:
        md.append(f"* the monitor took {np.median(secs):.1f} s per epoch (median)")
    return md


def monitor_section(epochs: List[Dict], pics: str) -> List[str]:
    """``knn_monitor.png`` and its lines, or why there is none."""
    md = ["", "## kNN monitor", ""]
    keys = [k for k in MONITOR_KEYS if any(k in r for r in epochs)]
    mon = [r for r in epochs if any(k in r for k in MONITOR_KEYS)]  # (not e.g. the final ranks_agree record)
    number_epochs(mon)
    inits = [r["knn_monitor_init"] for r in epochs if "knn_monitor_init" in r]
    init = inits[-1] if inits else None  # (the random-init level, measured before step 0)
    if not keys:
        return md + [
            f"No epoch record in metrics.jsonl carries {' or '.join(f'`{k}`' for k in MONITOR_KEYS)} "
            f"(the monitor is off, `train.monitor_every=0`, the data has no labels, or no epoch ended)."
        ]
    plot_monitor(mon, keys, os.path.join(pics, "knn_monitor.png"), init)
    say("wrote report/knn_monitor.png")
    return md + ["![per-epoch kNN monitor](report/knn_monitor.png)", ""] + monitor_lines(mon, keys, init)


def evaluation_section(run_dir: str) -> List[str]:
    """The table of the run folder's evaluation files, or how to make them."""
    md = ["", "## Evaluation", ""]
    evals = read_evals(run_dir)
    if evals:
        md += eval_table(evals)
        md += ["", "From `python -m fastssl.eval --checkpoint checkpoints/last.pt --protocol P [--random-init]`."]
    else:
        md.append(
            "No `eval_<protocol>[_random].json` in the run folder; make them with "
            "`python -m fastssl.eval --checkpoint "
            + os.path.join(run_dir, "checkpoints", "last.pt")
            + " --protocol linear` (and again with `--random-init`)."
        )
    return md


def retrieval_section(cfg, state, a, pics: str, skipped: List[str]) -> Tuple[Optional[Dict], List[str]]:
    """(the retrieval result or None, its lines): ``retrieval.png`` and the label agreement, or
    why there is no grid (the data could not be built); what is left out goes to ``skipped``."""
    from fastssl.config import ConfigError

    md = ["", "## Nearest neighbours", ""]
    try:
        from fastssl.data.sources import build_source

        say(f"building the data source ({cfg.data.source})")
        source = build_source(cfg)
        say(f"retrieval: features of up to {a.gallery} training images and the queries, trained and random init")
        res = retrieval(cfg, state, source, os.path.join(pics, "retrieval.png"), a.gallery, a.queries, a.neighbours)
        say("wrote report/retrieval.png")
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        say(f"no retrieval grid: {why}")
        skipped.append("the retrieval grid")
        return None, md + [f"No retrieval grid: {why}."]
    md += [
        "![test images and their nearest training images](report/retrieval.png)",
        "",
        f"Each row: a test image, then its {res['neighbours']} nearest of {res['gallery']:,} training images "
        f"(a seeded subset) by cosine similarity of the backbone's pooled `{res['stage']}` features of whole "
        "images: learned (left) and the same network untrained (right, as `--random-init`).",
    ]
    if res["labels"]:
        md[-1] += " Green border: same label as the query; red: another label."
        md += [
            "",
            f"Neighbours with the query's label, over {res['scored']:,} test images: "
            f"**{res['agree_learned']:.1f}%** learned, {res['agree_random']:.1f}% random init "
            f"(chance: {res['chance']:.1f}%).",
        ]
    else:
        md[-1] += " The data has no labels: neighbours are not marked and no agreement is computed."
        skipped.append("the label marks and agreement of the retrieval grid (no labels)")
    return res, md


def convs_without_data(cfg, state):
    """(learned, random, name) of the first convolution, from the backbone alone (no data: the
    retrieval grid is missing); None where it could not be built."""
    import torch

    from fastssl.config import ConfigError
    from fastssl.eval.__main__ import load_backbone

    conv_l = conv_r = conv_name = None
    try:
        size = cfg.data.builtin.image_size if cfg.data.source == "builtin" else (cfg.data.image_size or 96)
        src = type("S", (), {"image_size": size})()
        for which, st in (("l", state), ("r", None)):
            conv_name, conv = first_conv(load_backbone(cfg, st, src, torch.device("cpu")))
            if conv is not None:
                w = conv.weight.detach().float().numpy()
                conv_l, conv_r = (w, conv_r) if which == "l" else (conv_l, w)
    except (ConfigError, RuntimeError) as e:
        say(f"no filters: {str(e).splitlines()[0]}")
    return conv_l, conv_r, conv_name


def filters_section(cfg, state, res: Optional[Dict], run_dir: str, pics: str, skipped: List[str]) -> List[str]:
    """``filters.png``: the first convolution learned beside random init, and its distance."""
    md = ["", "## First-layer filters", ""]
    if res is not None:
        conv_l, conv_r, conv_name = res["conv_learned"], res["conv_random"], res["conv_name"]
    else:  # no data: the backbone alone
        conv_l, conv_r, conv_name = convs_without_data(cfg, state)
    if conv_l is None:
        skipped.append("the filters")
        return md + ["No convolution found in the backbone."]
    plot_filters(conv_l, conv_r, conv_name, os.path.join(pics, "filters.png"))
    say("wrote report/filters.png")
    md.append("![first-layer filters, learned and random init](report/filters.png)")
    if conv_r is not None and conv_r.shape == conv_l.shape:
        rel = float(np.linalg.norm(conv_l - conv_r) / max(np.linalg.norm(conv_r), 1e-12))
        md += [
            "",
            f"`{conv_name}` ({conv_l.shape[0]} filters of {conv_l.shape[1]} x {conv_l.shape[2]} x "
            f"{conv_l.shape[3]}): relative distance from the random-init filters "
            f"||W - W_random|| / ||W_random|| = {rel:.3f}.",
        ]
    if os.path.isfile(os.path.join(run_dir, "filters", "layer1.png")):
        md += [
            "",
            "The run also wrote its first layer's filters itself (same stretch): "
            "![filters/layer1.png](filters/layer1.png)",
        ]
    return md


def config_section(config_text: str, skipped: List[str]) -> List[str]:
    """The resolved config.yaml in a collapsible block, and what the report skipped."""
    md = [
        "",
        "## Config",
        "",
        "<details><summary>config.yaml (the resolved config of the run)</summary>",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
        "</details>",
    ]
    if skipped:
        md += ["", "Skipped: " + "; ".join(skipped) + "."]
    return md


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastssl.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="a run folder written by fastssl/train.py (out_dir)")
    p.add_argument("--gallery", type=int, default=2000, help="training images searched for neighbours (seeded subset)")
    p.add_argument("--queries", type=int, default=16, help="test images shown in the retrieval grid")
    p.add_argument("--neighbours", type=int, default=8, help="neighbours shown per query")
    return p.parse_args(argv)


def refusal(a) -> Optional[str]:
    """Why the report cannot be made (not a run folder, bad numbers, no matplotlib), or None."""
    run_dir = a.run_dir
    if not os.path.isdir(run_dir):
        return f"{run_dir}: no such folder"
    missing = missing_parts(run_dir)
    if missing:
        return f"{run_dir} is not a run folder: no {', no '.join(missing)}"
    if min(a.gallery, a.queries, a.neighbours) < 1:
        return "--gallery, --queries and --neighbours must be >= 1"
    try:
        _plt()
    except ImportError:
        return "needs matplotlib (pip install matplotlib)"
    return None


def fail(why: str) -> int:
    print(f"fastssl.report: error: {why}", file=sys.stderr)
    return 2


def fresh_pictures(run_dir: str) -> str:
    """``RUN_DIR/report``, emptied of the pictures of an earlier report."""
    pics = os.path.join(run_dir, "report")
    os.makedirs(pics, exist_ok=True)
    for old in glob.glob(os.path.join(pics, "*.png")):  # a report shows only what this one drew
        os.remove(old)
    return pics


def main(argv=None) -> int:
    a = parse_args(argv)
    run_dir = a.run_dir
    why = refusal(a)
    if why:
        return fail(why)
    t0 = time.perf_counter()
    pics = fresh_pictures(run_dir)
    from fastssl.config import ConfigError, load_config
    from fastssl.engine import checkpoint as ckpt

    ck_path = os.path.join(run_dir, "checkpoints", "last.pt")
    say(f"reading {ck_path}")
    try:
        state = ckpt.load(ck_path)
        cfg = load_config(state["config"])
    except (ckpt.CheckpointError, ConfigError) as e:
        return fail(str(e))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config_text = f.read()
    skipped: List[str] = []
    md = header_section(run_dir, ck_path, state, cfg)
    steps, epochs, bad = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    say(f"metrics.jsonl: {len(steps)} step records, {len(epochs)} epoch records")
    md += training_section(steps, bad, pics)
    md += monitor_section(epochs, pics)
    md += evaluation_section(run_dir)
    res, lines = retrieval_section(cfg, state, a, pics, skipped)
    md += lines
    md += filters_section(cfg, state, res, run_dir, pics, skipped)
    md += config_section(config_text, skipped)
    out = os.path.join(run_dir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(md) + "\n")
    n_png = len(glob.glob(os.path.join(pics, "*.png")))
    say(f"wrote {out} ({n_png} pictures in {pics}, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
