"""Run every benchmark suite that applies to this machine and write one report.

    python -m benchmarks [--tiny] [--suites imagenet pipelines kernels knn lab exemplar train_step] [--out DIR]

Suites: the headline (pre-training from an ImageNet-shaped JPEG folder: benchmarks/imagenet.py), data pipelines per method (DALI GPU / DALI CPU / torchvision DataLoader), fused loss
kernels (fused / eager / torch.compile; GPU only, or the interpreter with --tiny), kNN graph
(FAISS / torch / scikit-learn), Lab conversion + quantisation (DALI GPU / DALI CPU /
scikit-image), Exemplar-CNN surrogate patches (DALI GPU / DALI CPU / DataLoader), end-to-end training steps per method and pipeline
(images/s, data-stall); and, asked by name (hours on a CPU), learning: each method's recipe on real
images against random init (docs/learning.md).  Each compares against its baseline in the same run.  Results go to
benchmarks/results/<device>/: one JSON and one markdown table per suite, PNG plots, and
report.md (every suite's latest table in the folder) + environment.json; ``python -m
benchmarks.readme`` copies the reports into docs/benchmarks.md.  --tiny runs small sizes in a few minutes (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import exemplar, folder, imagenet, kernels, knn, lab, learning, pipelines, train_step  # noqa: E402
from benchmarks.common import RESULTS, device_name, environment, missing  # noqa: E402
from fastssl.methods import for_tools  # noqa: E402

SUITES = ("imagenet", "pipelines", "folder", "kernels", "knn", "lab", "exemplar", "train_step", "learning")
NEEDS = {"lab": "nvidia.dali", "exemplar": "nvidia.dali", "knn": "faiss"}  # (pipelines: DALI rows fail alone)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--suites", nargs="+", default=list(SUITES[:-1]), choices=SUITES)  # (learning: asked by name)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    out = a.out or os.path.join(RESULTS, device_name())
    os.makedirs(out, exist_ok=True)
    tiny = a.tiny
    for suite in a.suites:
        print(f"== {suite}", flush=True)
        why = missing(NEEDS[suite]) if suite in NEEDS else None
        if why:
            print(f"{suite}: skipped ({why})", flush=True)
            continue
        if suite == "imagenet":
            imagenet.main(["--out", out] + (["--tiny"] if tiny else []))
        elif suite == "pipelines":
            for m in for_tools("pipelines"):
                pipelines.main(
                    ["--method", m, "--out", out]
                    + (["--sizes", "32", "--images", "512", "--batch", "64", "--repeats", "1"] if tiny else [])
                )
        elif suite == "folder":
            folder.main(["--out", out] + (["--tiny"] if tiny else []))
        elif suite == "kernels":
            if not torch.cuda.is_available() and not tiny:
                print("kernels: skipped (no CUDA GPU; the fused kernels only run for real on one)")
                continue
            kernels.main(["--out", out] + (["--tiny"] if tiny else []))
        elif suite == "knn":
            knn.main(["--out", out] + (["--n", "2000", "--repeats", "1"] if tiny else []))
        elif suite == "lab":
            lab.main(["--out", out] + (["--images", "256", "--batch", "64", "--repeats", "1"] if tiny else []))
        elif suite == "exemplar":
            exemplar.main(
                ["--out", out]
                + (["--images", "128", "--per-class", "4", "--batch", "128", "--repeats", "1"] if tiny else [])
            )
        elif suite == "learning":  # (each method's recipe on real images vs random init: docs/learning.md)
            learning.main(["--out", out] + (["--tiny", "--docs", ""] if tiny else []))
        else:
            train_step.main(
                ["--out", out]
                + (
                    [
                        "--methods",
                        *for_tools("train_step-tiny"),
                        "--steps",
                        "6",
                        "data.batch_size=32",
                        "data.builtin.num_train=512",
                    ]
                    if tiny
                    else []
                )
            )
    write_report(out)


def write_report(out: str) -> None:
    """report.md + environment.json from every suite's latest table in ``out`` (a partial
    re-run refreshes only its own part)."""
    env = environment()
    with open(os.path.join(out, "environment.json"), "w") as f:
        json.dump(env, f, indent=2)
    parts = [
        f"# fastssl benchmarks on {device_name()}\n",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None) + "\n",
    ]
    names = (
        ["imagenet"]
        + [f"pipelines-{m}" for m in for_tools("pipelines")]
        + [
            "folder",
            "kernels",
            "knn",
            "knn-scale",
            "knn-ivf-recall",
            "bank-precision",
            "lab",
            "exemplar",
            "train_step",
            "learning",
        ]
    )
    for name in names:
        if os.path.isfile(os.path.join(out, f"{name}.md")):
            parts.append("## " + _body(os.path.join(out, f"{name}.md")))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(parts))
    print("report:", os.path.join(out, "report.md"))


def _body(path):
    """A suite's markdown with its title demoted to a section."""
    text = open(path).read()
    return text[2:] if text.startswith("# ") else text


if __name__ == "__main__":
    main()
