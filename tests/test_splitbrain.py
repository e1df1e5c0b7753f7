"""Split-Brain: Lab and quantised targets in the DALI pipeline vs scikit-image/NumPy, the split
network, the pipeline executors, and a short run that beats random init."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.color import lab2rgb, rgb2lab

from benchmarks.lab import reference_bins
from conftest import ROOT, eval_trained_and_random, run, run_dali_graph, train_cmd
from fastssl.config import ConfigError
from fastssl.data.lab import ColorSplit, dali_colour, rgb_to_lab

CFG = "configs/splitbrain/builtin.yaml"


def real_images(side=96):
    """Crops of scikit-image's bundled photographs (real sRGB images)."""
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        im = getattr(skdata, name)()
        out.append(np.ascontiguousarray(im[100 : 100 + side, 150 : 150 + side]))
    return out


def random_images(n=4, side=96, seed=0):
    rng = np.random.default_rng(seed)
    ims = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]
    ims[0][:, : side // 2] = 0  # pure black and white regions (the linear branches of sRGB and f)
    ims[0][:, side // 2 :] = 255
    return ims


@pytest.mark.parametrize("kind", ["random", "real"])
def test_dali_lab_equals_skimage(kind):
    ims = random_images() if kind == "random" else real_images()
    (lab,) = run_dali_graph(ims, lambda x: [dali_colour(x, "lab")])
    ref = np.stack([rgb2lab(i) for i in ims])
    assert np.abs(lab - ref).max() < 1e-3


def test_torch_lab_equals_skimage():
    ims = random_images() + real_images()
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255
    ref = np.stack([rgb2lab(i) for i in ims])
    assert np.abs(rgb_to_lab(x).permute(0, 2, 3, 1).numpy() - ref).max() < 1e-3


@pytest.mark.parametrize("space", ["lab", "rgb"])
@pytest.mark.parametrize("rescale", [False, True])
def test_dali_targets_equal_numpy_bin_for_bin(space, rescale):
    split = ColorSplit(space=space, rescale=rescale, factor=8)
    ims = random_images() + real_images()
    _, t1, t2 = run_dali_graph(ims, lambda x: split.dali(x, 96))
    assert t1.shape == t2.shape == (len(ims), 12, 12) and t1.dtype == np.int32
    sure_total = []
    for k, im in enumerate(ims):
        ref, u = reference_bins(im, split)
        edge = np.abs(u - np.round(u))
        got = np.stack([t1[k], *np.divmod(t2[k], split.bins2)], -1)  # joint class -> its two bins
        sure = edge > 1e-4  # float32 vs float64 may only disagree on a bin edge (e.g. a = 0 of greys)
        np.testing.assert_array_equal(got[sure], ref[sure])
        sure_total.append(sure.mean())
    assert np.mean(sure_total[1:]) > 0.95  # image 0 (black | white) is all bin edges
    assert t1.max() < split.bins1 and t2.max() < split.bins2**2 and min(t1.min(), t2.min()) >= 0


def test_torch_executor_matches_dali():
    split = ColorSplit(space="lab", rescale=True, factor=4)
    ims = random_images(side=32) + [np.ascontiguousarray(i[:32, :32]) for i in real_images()]
    dali = run_dali_graph(ims, lambda x: split.dali(x, 32))
    ref = split.torch(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(dali[0], ref[0].numpy(), atol=1e-4)
    for d, t in zip(dali[1:], ref[1:]):
        assert (d == t.numpy()).mean() > 0.99


def blocks_image(colours_rgb, f=8):
    """An image made of f x f blocks of the given uint8 colours (row-major), padded with grey."""
    side = int(np.ceil(np.sqrt(len(colours_rgb))))
    grid = np.full((side * side, 3), 128, np.uint8)
    grid[: len(colours_rgb)] = colours_rgb
    return np.kron(grid.reshape(side, side, 3), np.ones((f, f, 1))).astype(np.uint8), side


def test_bin_centres_map_back_to_their_bins():
    split = ColorSplit(space="lab", factor=8, bins1=100, bins2=10)
    l_centres, ab_centres = split.bin_centres()
    # L centres as greys (a = b = 0), ab centres at L = 60 where they are inside the sRGB gamut
    lab_l = np.stack([l_centres, np.zeros(100), np.zeros(100)], 1)
    lab_ab = np.concatenate([np.full((100, 1), 60.0), ab_centres], 1)
    rgb_ab = lab2rgb(lab_ab[None])[0]
    in_gamut = np.abs(rgb2lab(rgb_ab[None])[0] - lab_ab).max(1) < 1.0
    assert in_gamut.sum() >= 20
    for lab, want, which, keep in (
        (lab_l, np.arange(100), 1, np.abs(l_centres - 50) < 49),
        (lab_ab, np.arange(100), 2, in_gamut),
    ):
        rgb = np.round(lab2rgb(lab[keep][None])[0] * 255).astype(np.uint8)
        im, side = blocks_image(rgb)
        out = run_dali_graph([im], lambda x: split.dali(x, im.shape[0]))[which][0].reshape(-1)
        np.testing.assert_array_equal(out[: keep.sum()], want[keep])


def test_halves_see_only_their_own_channels(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(config=f"{ROOT}/{CFG}")
    m = get_method("splitbrain")(cfg, build_backbone(cfg.model, 32), 32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    to_ab, to_l = m.predict(x)
    assert to_ab.shape == (2, 100, 4, 4) and to_l.shape == (2, 100, 4, 4)
    (g,) = torch.autograd.grad(to_ab.sum(), x, retain_graph=True)
    assert g[:, 0].abs().sum() > 0 and g[:, 1:].abs().sum() == 0  # L half: L only
    (g,) = torch.autograd.grad(to_l.sum(), x)
    assert g[:, 0].abs().sum() == 0 and g[:, 1:].abs().sum() > 0  # ab half: ab only
    feats = m.backbone.features(x)
    assert feats.shape == (2, m.backbone.halves[0].dim() + m.backbone.halves[1].dim())


@pytest.mark.parametrize("arch", ["split-simplenet", "split-resnet18"])
def test_loader_delivers_lab_input_and_targets(tiny_cfg, arch):
    from fastssl.data.sources import build_source
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(f"model.arch={arch}", "method.rescale=true", "eval.layer=null", config=f"{ROOT}/{CFG}")
    src = build_source(cfg)
    m = get_method("splitbrain")(cfg, build_backbone(cfg.model, 32), 32)
    batches = []
    for kind in ("dali-cpu", "torch"):
        c = tiny_cfg(
            f"model.arch={arch}",
            "method.rescale=true",
            "eval.layer=null",
            f"data.pipeline={kind}",
            config=f"{ROOT}/{CFG}",
        )
        loader = m.loader(c, src)
        loader.set_epoch(0)
        batches.append(next(iter(loader)))
    (dx, d1, d2), (tx, t1, t2) = batches[0]["views"], batches[1]["views"]
    assert dx.shape == (32, 3, 32, 32) and d1.shape == (32, 4, 4)
    torch.testing.assert_close(dx, tx, atol=1e-4, rtol=0)
    assert (d1 == t1).float().mean() > 0.99 and (d2 == t2).float().mean() > 0.99
    out = m(batches[0]["views"], batches[0]["index"])
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()


@pytest.mark.parametrize(
    "override, key",
    [
        (["model.arch=convnet", "eval.layer=null"], "model.arch"),
        (["method.space=hsv"], "method.space"),
        (["method.target_size=5"], "method.target_size"),
        (["method.crop_size=40"], "method.crop_size"),
        (["method.bins_ab=1"], "method.bins_l/bins_ab"),
        (["method.ab_range=[10,-10]"], "method.ab_range"),
    ],
)
def test_bad_settings_are_refused(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace("/", ".")):
        tiny_cfg(*override, config=f"{ROOT}/{CFG}")


@pytest.mark.slow
@pytest.mark.learning
def test_short_run_beats_random_init(tmp_path):
    out = tmp_path / "sb"
    run(
        train_cmd(
            str(out),
            "data.builtin.num_train=2048",
            "data.batch_size=64",
            "model.width=64",
            "train.epochs=5",
            config=CFG,
        ),
        timeout=900,
    )
    trained, random = eval_trained_and_random(out, "linear", "eval.linear_epochs=30", "eval.linear_seeds=2")
    assert trained["accuracy"] >= random["accuracy"] + 3, (trained, random)
