"""Evaluate a pre-trained (or randomly initialised) backbone on the labeled part of the data.

    python -m fastssl.eval --checkpoint runs/x/checkpoints/last.pt --protocol linear|knn|finetune|transfer|svm-folds \
        [--config FILE] [--random-init] [--out FILE.json] [--resume] [key=value ...]

``--random-init`` evaluates the same network untrained (seeded init), for comparison.
Results are printed and written as JSON (default: next to the checkpoint's run folder).
SIGTERM/SIGUSR1 stop an evaluation within one epoch of its current run, exit 0, and leave
the finished runs in ``<out>.partial.json``; ``--resume`` continues from them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from fastssl.config import load_config
from fastssl.data.sources import build_source
from fastssl.engine import checkpoint as ckpt
from fastssl.engine.signals import StopRequest
from fastssl.errors import ConfigError
from fastssl.eval.finetune import finetune
from fastssl.eval.harness import PROTOCOLS, EvalJob, get_protocol, protocol
from fastssl.eval.ledger import NO_LEDGER, Ledger, Preempted
from fastssl.eval.linear import linear_probe
from fastssl.eval.svm import eval_folds, svm_folds
from fastssl.eval.transfer import transfer
from fastssl.features.images import labeled_features
from fastssl.features.maps import extract_authors, extract_pooled
from fastssl.knn.classify import knn_accuracy
from fastssl.models import build_backbone

# The protocols, in the order --help lists them: each maps the config's eval.* keys to its function.


@protocol("linear")
def _linear(job: EvalJob):
    xtr, ytr, xte, yte = labeled_features(job.cfg, job.source, job.backbone, job.prepare, job.device, job.log)
    return linear_probe(xtr, ytr, xte, yte, job.settings, num_classes=job.source.num_classes, ledger=job.ledger)


@protocol("knn")
def _knn(job: EvalJob):  # one deterministic run: nothing to resume
    xtr, ytr, xte, yte = labeled_features(job.cfg, job.source, job.backbone, job.prepare, job.device, job.log)
    e = job.settings
    return knn_accuracy(xtr, ytr, xte, yte, job.source.num_classes, k=e.knn_k, temperature=e.knn_temperature)


@protocol("finetune")
def _finetune(job: EvalJob):
    return finetune(
        job.backbone, job.source, job.prepare, job.settings, device=job.device, log=job.log, ledger=job.ledger
    )


@protocol("transfer")
def _transfer(job: EvalJob):
    arch = job.cfg.model.arch
    if arch != "shallow":
        raise ConfigError(f"--protocol transfer: needs the 'shallow' net of the layerwise method, not {arch}")
    return transfer(
        job.backbone, job.source, job.prepare, job.settings, device=job.device, log=job.log, ledger=job.ledger
    )


@protocol("svm-folds")
def _svm_folds(job: EvalJob):
    e, source = job.settings, job.source
    t = time.time()
    folds = eval_folds(source, e.svm_folds, e.svm_fold_size, job.cfg.seed)
    used = np.unique(np.concatenate(folds))  # only the fold images' features are needed
    extract = extract_authors if e.svm_features == "authors" else extract_pooled  # (authors: without fc2, see svm.py)
    ftr = extract(job.backbone, source.train, source, job.prepare, e.batch_size, job.device, used).numpy()
    xtr = np.zeros((len(source.train), ftr.shape[1]), np.float32)
    xtr[used] = ftr
    xte = extract(job.backbone, source.test, source, job.prepare, e.batch_size, job.device).numpy()
    job.log(
        f"  features: {ftr.shape[1]} per image, {len(used)} train, {len(xte)} test ({time.time() - t:.1f}s); "
        f"{len(folds)} folds{' (predefined)' if source.folds else ''}"
    )
    ytr, yte = np.asarray(source.train.labels), np.asarray(source.test.labels)
    return svm_folds(xtr, ytr, xte, yte, folds, e, ledger=job.ledger, log=job.log)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastssl.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", help="a checkpoint written by fastssl/train.py")
    p.add_argument("--protocol", required=True, choices=tuple(PROTOCOLS))
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--random-init", action="store_true", help="evaluate the same network untrained")
    p.add_argument("--out", help="JSON output file (default: <run>/eval_<protocol>[_random].json)")
    p.add_argument("--resume", action="store_true", help="continue a pre-empted evaluation from <out>.partial.json")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.linear_epochs=50")
    return p.parse_args(argv)


def load_backbone(cfg, state, source, device):
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.model, source.image_size)
    if state is not None:  # only the backbone: method state (e.g. a memory bank) is not needed here
        try:
            backbone.load_state_dict(
                {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}
            )
        except RuntimeError as e:
            raise ConfigError(
                f"--checkpoint: its backbone does not fit model.* of the config: {str(e).splitlines()[0]}"
            ) from None
    return backbone.to(device)


def evaluate(cfg, protocol: str, state, device, log=print, ledger=NO_LEDGER):
    # at call time: importers of this module for load_backbone (fastssl.report) need no method module
    from fastssl.methods import get_method

    run = get_protocol(protocol)
    source = build_source(cfg)
    if source.train.labels is None or len(source.test) == 0 or source.test.labels is None:
        raise ConfigError(
            f"data.path: {cfg.data.source} at {cfg.data.path} has no labeled train/test images to evaluate on"
        )
    backbone = load_backbone(cfg, state, source, device)
    prepare = get_method(cfg.method.name).eval_input(cfg, source)  # uint8 images -> the network's input
    return run(EvalJob(cfg, source, backbone, prepare, device, log, ledger))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state = None
        if args.checkpoint:
            state = ckpt.load(args.checkpoint)
        elif not (args.random_init and args.config):
            raise ConfigError("--checkpoint: required (or --random-init with --config)")
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = load_config(state["config"], args.overrides)
    except (ConfigError, ckpt.CheckpointError) as e:
        print(f"fastssl.eval: error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what = "random-init" if args.random_init else (args.checkpoint or "")
    print(
        f"fastssl.eval: {args.protocol} | {cfg.method.name}/{cfg.model.arch} | {what} | {cfg.data.source}", flush=True
    )
    out = args.out
    if out is None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))) if args.checkpoint else cfg.out_dir
        out = os.path.join(run_dir, f"eval_{args.protocol}{'_random' if args.random_init else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stop = StopRequest()
    ledger = Ledger(out + ".partial.json", stop, args.resume)
    if ledger.runs:
        print(f"fastssl.eval: resuming: runs {sorted(ledger.runs)} already done", flush=True)
    try:
        res = evaluate(cfg, args.protocol, None if args.random_init else state, device, ledger=ledger)
    except ConfigError as e:
        print(f"fastssl.eval: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(
            f"fastssl.eval: {e}: stopped; {len(ledger.runs)} finished runs kept in {ledger.path}; "
            f"continue with --resume",
            flush=True,
        )
        return 0
    finally:
        stop.restore()
    res.update(
        protocol=args.protocol,
        random_init=args.random_init,
        checkpoint=args.checkpoint,
        dataset=cfg.data.source,
        arch=cfg.model.arch,
        method=cfg.method.name,
    )
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    ledger.discard()
    std = f" +- {res['std']:.2f}" if "std" in res else ""
    print(f"fastssl.eval: {args.protocol} accuracy {res['accuracy']:.2f}%{std} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
