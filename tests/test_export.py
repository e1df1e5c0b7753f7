"""fastssl export: the exported backbones give fastssl's features outside fastssl.

Round trips: a 1-step SC run with ``resnet18`` (32 px, so the small 3x3 stem) exported for
torchvision, and one with ``convnet`` exported as a plain state dict; "features" are the
pooled last-stage output (fastssl's ``Backbone.features``; the torchvision model with
``fc = nn.Identity()``).  The runs are made in-process (``fastssl.train.main``, the function
``fastssl train`` calls) to keep this file to a few seconds; test_cli.py runs the commands.
"""

import glob
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT, TINY


def _train(out_dir, *overrides, config=os.path.join(ROOT, "configs/sc/builtin.yaml")):
    from fastssl.train import main

    rc = main(
        [
            "--config",
            config,
            *TINY,
            "train.max_steps=1",
            "train.tensorboard=false",
            "data.pipeline=torch",
            "data.num_workers=0",
            f"out_dir={out_dir}",
            *overrides,
        ]
    )
    assert rc == 0
    return os.path.join(out_dir, "checkpoints", "last.pt")


def _fastssl_backbone(ck_path):
    """The checkpoint's backbone as fastssl's evaluation builds it (not through fastssl.export)."""
    from fastssl.models import build_backbone

    state = torch.load(ck_path, map_location="cpu", weights_only=False)
    net = build_backbone(OmegaConf.create(state["config"]).model, 32)
    net.load_state_dict({k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")})
    return net.eval()


def _images(n=6):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.3  # the built-in source's eval input scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    return {
        "resnet18": _train(d / "r18", "model.arch=resnet18", "data.batch_size=8"),
        "convnet": _train(d / "conv"),
        "dir": d,
    }


def test_resnet18_torchvision_round_trip(runs, capsys):
    import torchvision

    from fastssl.export import SMALL_STEM_LINES, main

    out = runs["dir"] / "r18_tv.pt"
    assert main(["--checkpoint", runs["resnet18"], "--format", "torchvision", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in SMALL_STEM_LINES:  # export tells the user the two-line stem change
        assert line in printed
    ck = torch.load(out, weights_only=True)  # plain tensors and Python values only
    meta = ck["meta"]
    assert meta["arch"] == "resnet18" and meta["stem"] == "small" and meta["stem_change"] == list(SMALL_STEM_LINES)
    assert meta["image_size"] == 32 and meta["format"] == "torchvision"
    assert not [k for k in ck["state_dict"] if k.startswith("fc.")]

    # the README's snippet
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(ck["state_dict"], strict=True)
    model.eval()

    x = _images()
    with torch.no_grad():
        ref = _fastssl_backbone(runs["resnet18"]).features(x)
        got = model(x)
    assert got.shape == ref.shape == (6, 512)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not glob.glob(str(runs["dir"] / ".tmp-*"))  # written atomically: no temporary file left


def test_convnet_state_dict_round_trip(runs, capsys):
    import fastssl.models
    from fastssl.export import main

    out = runs["dir"] / "conv_sd.pt"
    assert main(["--checkpoint", runs["convnet"], "--format", "state_dict", "--out", str(out)]) == 0
    assert "fastssl.models.build" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    meta = ck["meta"]
    assert meta["arch"] == "convnet" and meta["model"]["width"] == 16 and meta["image_size"] == 32
    assert meta["input"]["mean"] == [0.5, 0.5, 0.5] and meta["feature_dim"] == 64
    net = fastssl.models.build(**meta["build"])
    net.load_state_dict(ck["state_dict"], strict=True)
    net.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), _fastssl_backbone(runs["convnet"]).features(x), atol=1e-5, rtol=0)


def test_refusals_are_one_line(runs, tmp_path, capsys):
    from fastssl.export import main

    def err(*args):
        assert main(list(args)) == 2
        e = capsys.readouterr().err.strip()
        assert "\n" not in e, e
        return e

    out = str(tmp_path / "b.pt")
    assert "no such file" in err("--checkpoint", str(tmp_path / "none.pt"), "--out", out)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert "not a fastssl checkpoint" in err("--checkpoint", str(junk), "--out", out)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert "not a fastssl checkpoint" in err("--checkpoint", str(tmp_path / "other.pt"), "--out", out)
    e = err("--checkpoint", runs["convnet"], "--format", "torchvision", "--out", out)
    assert "convnet" in e and "state_dict" in e
    assert not os.path.exists(out)


def test_timm(runs, tmp_path, capsys):
    import importlib.util

    from fastssl.export import main

    out = tmp_path / "r18_timm.pt"
    rc = main(["--checkpoint", runs["resnet18"], "--format", "timm", "--out", str(out)])
    if importlib.util.find_spec("timm") is None:  # optional dependency: a one-line refusal
        assert rc == 2
        e = capsys.readouterr().err.strip()
        assert "timm is not installed" in e and "\n" not in e
        assert not out.exists()
        return
    import timm

    assert rc == 0
    ck = torch.load(out, weights_only=True)
    model = timm.create_model("resnet18", num_classes=0)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.load_state_dict(ck["state_dict"], strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), _fastssl_backbone(runs["resnet18"]).features(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_key_mapping_matches_torchvision(arch, stem):
    """fastssl's stage-wrapped ResNet keys map one to one onto torchvision's (and timm's, which
    are the same names) with the same shapes, fc excepted."""
    import torchvision

    import fastssl.models
    from fastssl.export import timm_key, torchvision_key

    ours = fastssl.models.build(arch, stem=stem).state_dict()
    ref = getattr(torchvision.models, arch)()
    if stem == "small":
        ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    theirs = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {torchvision_key(k): v.shape for k, v in ours.items()} == theirs
    assert all(timm_key(k) == torchvision_key(k) for k in ours)


def test_build_and_source_stats(tiny_cfg):
    import fastssl.models
    from fastssl.data.sources import build_source
    from fastssl.export import SOURCE_STATS

    with pytest.raises(ValueError, match="unknown backbone"):
        fastssl.models.build("vgg")
    assert fastssl.models.build("shallow", width=8).dim() == 32
    s = build_source(tiny_cfg())
    assert SOURCE_STATS["builtin"] == (tuple(s.mean), tuple(s.std))


def test_each_method_describes_its_own_input(tiny_cfg):
    """The exported input description is the method's (``Method.input_spec``): a layer-wise run with
    ``method.input=raw`` (the authors' CIFAR-100 recipe) takes x / 255, not standardised pixels."""
    from fastssl.export import input_spec

    authors = tiny_cfg("data.source=builtin", config=f"{ROOT}/configs/layerwise/cifar100-authors.yaml")
    assert authors.method.input == "raw"
    spec = input_spec(authors)
    assert spec["pixels"] == "x / 255" and "mean" not in spec and "std" not in spec
    lw = tiny_cfg(config=f"{ROOT}/configs/layerwise/builtin.yaml")
    assert input_spec(lw) == {"pixels": "(x / 255 - mean) / std", "mean": [0.5] * 3, "std": [0.3] * 3}
    assert input_spec(tiny_cfg()) == input_spec(lw)  # sc: the source's statistics
    from fastssl.methods import get_method

    ex = tiny_cfg(*get_method("exemplar").tiny, config=f"{ROOT}/configs/exemplar/builtin.yaml")
    assert input_spec(ex)["pixels"] == "x / 255"
    sb = tiny_cfg(config=f"{ROOT}/configs/splitbrain/builtin.yaml")
    assert input_spec(sb)["pixels"].startswith("colour split of method.space=")


@pytest.mark.slow
def test_layerwise_raw_input_export_round_trip(tmp_path):
    """A layer-wise input=raw run exported: the description says x / 255, and the exported net on
    x / 255 gives the features fastssl's evaluation computes (``eval_input``) from the same images."""

    import fastssl.models
    from fastssl.config import load_config
    from fastssl.export import main
    from fastssl.methods import get_method

    ck_path = _train(
        tmp_path / "lw",
        "method.input=raw",
        "model.width=8",
        config=os.path.join(ROOT, "configs/layerwise/builtin.yaml"),
    )
    out = tmp_path / "lw.pt"
    assert main(["--checkpoint", ck_path, "--out", str(out)]) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["meta"]["method"] == "layerwise" and ck["meta"]["input"]["pixels"] == "x / 255"
    net = fastssl.models.build(**ck["meta"]["build"])
    net.load_state_dict(ck["state_dict"], strict=True)
    net.eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = load_config(OmegaConf.create(ck["meta"]["config"]))
    prepare = get_method("layerwise").eval_input(cfg, None)  # (raw: no source statistics needed)
    with torch.no_grad():
        torch.testing.assert_close(
            net.features(x.float() / 255, "layer1"),
            _fastssl_backbone(ck_path).features(prepare(x), "layer1"),
            atol=0,
            rtol=0,
        )
