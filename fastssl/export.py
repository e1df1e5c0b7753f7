"""Export a trained backbone for use outside fastssl.

    fastssl export --checkpoint runs/x/checkpoints/last.pt --format torchvision --out backbone.pt
    python -m fastssl.export --checkpoint ... --format torchvision|timm|state_dict --out FILE

The backbone is rebuilt from the checkpoint's stored config (as ``python -m fastssl.eval``
builds it; no data is read) and its weights are loaded.  Every format writes one file
``{"state_dict": ..., "meta": {...}}`` (tensors and plain Python values only, so
``torch.load(FILE)`` works with ``weights_only=True``):

* ``torchvision``: ResNet-18/50 backbones under torchvision's names (``conv1``, ``bn1``,
  ``layer1`` ... ``layer4``), without ``fc``: it loads with ``strict=True`` into
  ``torchvision.models.resnet18()`` / ``resnet50()`` whose ``fc`` is ``nn.Identity()`` (the
  model then returns the pooled last-stage features, the vector fastssl evaluates).  A
  backbone trained with the small stem (3x3 stride-1 conv1, no max-pool: 32-64 px inputs)
  needs two lines on the torchvision model first; the export prints them and records the stem
  in ``meta["stem"]``.
* ``timm``: the same state dict for ``timm.create_model("resnet18"/"resnet50", num_classes=0)``
  (timm's ResNets use torchvision's parameter names); needs timm installed.
* ``state_dict``: any backbone (``convnet``, ``shallow``, ``exemplar-cnn``, split nets,
  ResNets) under fastssl's own names; ``fastssl.models.build(**meta["build"])`` rebuilds the
  network so ``load_state_dict(..., strict=True)`` works.

``meta`` holds ``arch``, the model config, the image size, the stem, the input normalisation
evaluation used, the method, the training step and the loading snippet.  The file is written
atomically (temporary file, fsync, rename).  Errors are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

FORMATS = ("torchvision", "timm", "state_dict")
RESNETS = ("resnet18", "resnet50")
EXAMPLE = "fastssl export --checkpoint runs/x/checkpoints/last.pt --format torchvision --out backbone.pt"
SMALL_STEM_LINES = ("model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)", "model.maxpool = nn.Identity()")

# The per-channel statistics each source's evaluation input is standardised with (on [0, 1]
# pixels; fastssl/data/sources.py, tested against it for the built-in source).
SOURCE_STATS = {
    "builtin": ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3)),
    "stl10": ((0.447, 0.440, 0.407), (0.260, 0.257, 0.271)),
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIDE = {"stl10": 96, "cifar10": 32, "cifar100": 32}


class ExportError(Exception):
    pass


def image_size(cfg) -> int:
    """The side of the images the run trained on, from its config alone (no data is read)."""
    src = cfg.data.source
    if src == "builtin":
        return int(cfg.data.builtin.image_size)
    if src == "folder":
        return int(cfg.data.image_size or 96)
    return NATIVE_SIDE.get(src, 32 if cfg.data.image_size is None else int(cfg.data.image_size))


def torchvision_key(key: str) -> str:
    """A fastssl ResNet backbone key -> torchvision's (``stem.0`` conv1, ``stem.1`` bn1,
    ``stages.layerN`` layerN)."""
    for a, b in (("stem.0.", "conv1."), ("stem.1.", "bn1."), ("stages.", "")):
        if key.startswith(a):
            return b + key[len(a) :]
    raise ExportError(f"unexpected ResNet backbone key {key!r}")


timm_key = torchvision_key  # timm's ResNets name conv1/bn1/layerN/downsample.0|1 as torchvision does


def input_spec(cfg):
    """How evaluation turns uint8 images into the network's input: the method says
    (``Method.input_spec``), given the source's statistics where they are known."""
    from fastssl.methods import get_method

    return get_method(cfg.method.name).input_spec(cfg, SOURCE_STATS.get(cfg.data.source))


def _load_checkpoint(path: str):
    from fastssl.engine.checkpoint import CheckpointError, read

    try:
        state = read(path)
    except CheckpointError as e:
        msg = str(e)
        if "unreadable or corrupt" in msg:  # (not a file torch.load reads at all)
            msg = f"{path} is not a fastssl checkpoint ({msg})"
        raise ExportError(msg) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError(
            f"{path} is not a fastssl checkpoint (no 'model' and 'config' entries; "
            f"expected RUN/checkpoints/last.pt written by fastssl train)"
        )
    try:
        cfg = state["config"]
        if isinstance(cfg, dict):  # (plain dicts; older checkpoints pickled a DictConfig)
            from omegaconf import OmegaConf

            cfg = OmegaConf.create(cfg)
        arch, _ = str(cfg.model.arch), cfg.data.source
    except Exception:
        raise ExportError(
            f"{path} is not a fastssl checkpoint (its 'config' has no model.arch / data.source)"
        ) from None
    weights = {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if not weights:
        raise ExportError(f"{path} is not a fastssl checkpoint (no 'backbone.*' weights in its model)")
    return state, cfg, arch, weights


def _verify(model, sd, what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"internal: the exported weights do not load into {what}: {str(e).splitlines()[0]}") from None


def snippet(fmt: str, arch: str, stem: str, out: str) -> list:
    """The Python lines that load the exported file (stored in meta["load"] and printed)."""
    f = os.path.basename(out)
    stem_lines = list(SMALL_STEM_LINES) if stem == "small" else []
    if fmt == "state_dict":
        return [
            "import torch, fastssl.models",
            f'ck = torch.load("{f}")',
            'net = fastssl.models.build(**ck["meta"]["build"])',
            'net.load_state_dict(ck["state_dict"], strict=True)',
            "# features: net.features(x) = the last stage, average-pooled",
        ]
    head = (
        [
            "import torch, torchvision",
            "from torch import nn",
            f"model = torchvision.models.{arch}()",
            "model.fc = nn.Identity()",
        ]
        if fmt == "torchvision"
        else ["import torch, timm", "from torch import nn", f'model = timm.create_model("{arch}", num_classes=0)']
    )
    return (
        head
        + stem_lines
        + [
            f'model.load_state_dict(torch.load("{f}")["state_dict"], strict=True)',
            "# features: model(x) = the last stage, average-pooled",
        ]
    )


def _check_request(checkpoint: str, fmt: str) -> None:
    """The format and the file, before anything is read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: one of {', '.join(FORMATS)}, not {fmt!r}")
    if not os.path.exists(checkpoint):
        raise ExportError(f"--checkpoint: no such file: {checkpoint}")
    if not os.path.isfile(checkpoint):
        raise ExportError(f"--checkpoint: not a file: {checkpoint}")
    if fmt == "timm" and importlib.util.find_spec("timm") is None:
        raise ExportError(
            "--format timm: timm is not installed (pip install timm); --format torchvision "
            "writes the same keys for ResNets"
        )


def _rebuild(checkpoint: str, cfg, arch: str, weights: dict):
    """The backbone rebuilt from its config and loaded strictly: (net, its build arguments, stem)."""
    from fastssl import models

    m = cfg.model
    stem = str(m.stem)
    if arch in RESNETS:  # the stem the weights have (3x3: the small-image stem), whatever the config says
        w = weights.get("stem.0.weight")
        stem = "small" if w is not None and tuple(w.shape[-2:]) == (3, 3) else "imagenet"
    build = {"name": arch, "width": int(m.width), "kernel": int(m.kernel), "stem": stem, "image_size": image_size(cfg)}
    net = models.build(**build)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"{checkpoint}: its backbone weights do not fit its config's model ({arch}): {str(e).splitlines()[0]}"
        ) from None
    return net, build, stem


def _foreign_keys(sd: dict, fmt: str, arch: str, stem: str) -> dict:
    """The state dict under torchvision's or timm's key names, checked by loading it strictly into
    that library's own model (with the small stem swapped in where the weights have it)."""
    import torch

    if fmt == "torchvision":
        import torchvision

        sd = {torchvision_key(k): v for k, v in sd.items()}
        ref = getattr(torchvision.models, arch)(weights=None)
    else:
        import timm

        sd = {timm_key(k): v for k, v in sd.items()}
        ref = timm.create_model(arch, pretrained=False, num_classes=0)
    if stem == "small":
        ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        ref.maxpool = torch.nn.Identity()
    ref.fc = torch.nn.Identity()
    _verify(ref, sd, f"{fmt}'s {arch}")
    return sd


def _metadata(checkpoint, fmt, out, state, cfg, arch, net, build, stem) -> dict:
    """What the exported file says about itself (``meta``): how to build and feed the backbone."""
    from omegaconf import OmegaConf

    from fastssl import __version__ as fastssl_version

    return {
        "format": fmt,
        "arch": arch,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "image_size": build["image_size"],
        "stem": stem if arch in RESNETS else None,
        "stem_change": list(SMALL_STEM_LINES) if fmt != "state_dict" and stem == "small" else [],
        "build": build,
        "input": input_spec(cfg),
        "feature_dim": int(net.dim()),
        "method": str(cfg.method.name),
        "step": int(state.get("step", -1)),
        "checkpoint": os.path.abspath(checkpoint),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "fastssl_version": fastssl_version,  # the fastssl that exported it
        "trained_with": state.get("fastssl_version"),  # the one that wrote the checkpoint (None: before 0.1.0's record)
        "load": snippet(fmt, arch, stem, out),
    }


def export(checkpoint: str, fmt: str, out: str) -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` in ``fmt``; returns the metadata."""
    _check_request(checkpoint, fmt)
    state, cfg, arch, weights = _load_checkpoint(checkpoint)
    if fmt in ("torchvision", "timm") and arch not in RESNETS:
        raise ExportError(
            f"--format {fmt}: only resnet18/resnet50 backbones map onto {fmt} models; "
            f"this checkpoint's backbone is {arch} (use --format state_dict)"
        )
    from fastssl.engine.checkpoint import save_atomic

    net, build, stem = _rebuild(checkpoint, cfg, arch, weights)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if fmt in ("torchvision", "timm"):
        sd = _foreign_keys(sd, fmt, arch, stem)
    meta = _metadata(checkpoint, fmt, out, state, cfg, arch, net, build, stem)
    try:
        save_atomic({"state_dict": sd, "meta": meta}, out)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write: {e}") from None
    return meta


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastssl.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint written by fastssl train (RUN/checkpoints/last.pt)"
    )
    p.add_argument(
        "--format",
        default="state_dict",
        choices=FORMATS,
        help="torchvision / timm: ResNet backbones under those libraries' names; state_dict: any backbone, "
        "fastssl's names (default)",
    )
    p.add_argument("--out", required=True, help="the file to write, e.g. backbone.pt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        meta = export(a.checkpoint, a.format, a.out)
    except ExportError as e:
        print(f"fastssl export: error: {e}", file=sys.stderr)
        return 2
    stem = f", {meta['stem']} stem" if meta["stem"] else ""
    print(
        f"fastssl export: {meta['method']}/{meta['arch']}{stem}, step {meta['step']} -> {a.out} "
        f"({a.format}, {meta['feature_dim']}-d features, {meta['image_size']} px images)"
    )
    if meta["stem_change"]:
        print("this backbone has the small stem (3x3 stride-1 conv1, no max-pool): change the model first with")
        print("\n".join("    " + line for line in meta["stem_change"]))
    print("load it with:")
    print("\n".join("    " + line for line in meta["load"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
