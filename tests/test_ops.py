"""Every augmentation op on every executor present here: the executor's pixels equal the op's
torch face on the same plan (DALI CPU within the stated tolerance of its own kernels; the
DataLoader and tensor executors run the torch faces, so exactly)."""

import numpy as np
import pytest
import torch

from conftest import EXECUTOR_MEAN, EXECUTOR_SIZE, EXECUTOR_STD, executors, reference
from fastssl.data.executors.tensor import TensorExecutor
from fastssl.data.lab import ColorSplit
from fastssl.data.ops import HSV, Blur, Crop, Flip, Grey, Normalise, Resize, SplitTargets, ToSpace, ViewContext
from fastssl.data.plan import ColorJitter, draw_blur, draw_hsv
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split, make_builtin

SIZE, MEAN, STD = EXECUTOR_SIZE, EXECUTOR_MEAN, EXECUTOR_STD


def draw(side=13, ragged=False, views=2):
    def f(rng, n):
        if ragged:
            h, w = rng.integers(6, SIZE, (n, views)), rng.integers(6, SIZE, (n, views))
        else:
            h = w = np.full((n, views), side)
        y = (rng.random((n, views)) * (SIZE - h + 1)).astype(np.int64)
        x = (rng.random((n, views)) * (SIZE - w + 1)).astype(np.int64)
        return {
            "box": np.stack([y, x, h, w], 2).astype(np.int32),
            "flip": rng.integers(0, 2, (n, views), dtype=np.uint8),
            "hsv": draw_hsv(rng, n, views, ColorJitter(hue=180, saturation=[0.0, 1.5], value=[0.6, 1.4])),
            "grey": (rng.random((n, views)) < 0.5).astype(np.uint8),
            "blur": draw_blur(rng, n, views, 0.7, [0.3, 2.0]),
        }

    return f


LAB = ColorSplit("lab", 20, 6, rescale=True, factor=4)
RGB = ColorSplit("rgb", 16, 8, rescale=False, factor=4)
# recipe -> (ops, ragged boxes, DALI tolerance: absolute on float outputs, share of equal target bins)
RECIPES = {
    "crop-flip": ([Crop(), Flip(), Normalise()], False, 1e-6),
    "resize": ([Crop(), Resize(), Flip(), Normalise()], True, "resize"),
    "hsv": ([Crop(), Flip(), HSV(), Normalise()], False, 1e-4),
    "grey": ([Crop(), Grey(), Normalise()], False, 1e-4),
    "hsv-grey": ([Crop(), HSV(), Grey(), Normalise()], False, 1e-4),
    "blur": ([Crop(), Blur(5), Normalise()], False, 1e-4),
    "blur-after-resize": ([Crop(), Resize(), Flip(), HSV(), Grey(), Blur(3), Normalise()], True, "resize"),
    "lab-targets": ([Crop(), Flip(), ToSpace("lab"), SplitTargets(LAB)], False, 1e-4),
    "rgb-targets": ([Crop(), Flip(), ToSpace("rgb"), SplitTargets(RGB)], False, 1e-4),
}


@pytest.fixture(scope="module")
def images():
    x, _ = make_builtin(64, SIZE, 10, seed=0)
    return x


def recipe(name):
    ops, ragged, _ = RECIPES[name]
    return Recipe(
        draw(16 if "targets" in name else 13, ragged), ops, views=2, size=16 if "targets" in name else 13, name=name
    )


@pytest.mark.parametrize("name", RECIPES)
def test_every_executor_equals_the_torch_faces(images, name):
    r = recipe(name)
    tol = RECIPES[name][2]
    for kind, ex in executors(Split(images=images), r).items():
        ex.set_epoch(1)
        n = 0
        for batch, (index, want) in zip(ex, reference(images, r, 1)):
            assert torch.equal(batch["index"], torch.from_numpy(index)), kind
            assert len(batch["views"]) == len(want) == 2 * r.outputs_per_view
            for got, ref in zip(batch["views"], want):
                assert got.shape == ref.shape and got.dtype == ref.dtype, (kind, got.shape, ref.shape)
                if kind != "dali-cpu":  # the same torch code on the same device: bit for bit
                    assert torch.equal(got, ref), (kind, name)
                elif not got.is_floating_point():  # quantised targets: a value on a bin edge may flip
                    assert (got == ref).float().mean() > 0.99, (name, (got == ref).float().mean())
                elif tol == "resize":  # DALI's and torchvision's resampling kernels differ slightly
                    assert (got - ref).abs().mean() < 0.05, (name, (got - ref).abs().mean())
                else:
                    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
            n += 1
        assert n == len(ex) == 4


def test_grey_is_the_luma_in_every_channel_and_leaves_the_others(images):
    x = torch.from_numpy(images[:8]).permute(0, 3, 1, 2)
    g = torch.tensor([1, 0] * 4, dtype=torch.uint8)
    out = Grey().torch(x, {"grey": g}, ViewContext(SIZE))
    luma = 0.299 * x[:, 0].double() + 0.587 * x[:, 1].double() + 0.114 * x[:, 2].double()
    for j in range(8):
        if g[j]:
            for c in range(3):
                torch.testing.assert_close(out[j, c].double(), luma[j], atol=1e-3, rtol=0)
        else:
            assert torch.equal(out[j], x[j].float())


def test_blur_is_a_gaussian_and_sigma_zero_changes_nothing(images):
    from scipy.ndimage import gaussian_filter

    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float()
    sigma = torch.tensor([0.0, 0.8, 1.5, 0.0])
    out = Blur(7).torch(x, {"blur": sigma}, ViewContext(SIZE))
    assert torch.equal(out[0], x[0]) and torch.equal(out[3], x[3])
    for j in (1, 2):  # window 7 = truncate at 3 pixels; 'mirror' is reflection without the edge pixel
        sj = float(sigma[j])
        want = gaussian_filter(x[j].numpy().astype(np.float64), sigma=(0, sj, sj), mode="mirror", truncate=3 / sj)
        np.testing.assert_allclose(out[j].numpy(), want, atol=1e-3)
    with pytest.raises(ValueError, match="odd"):
        Blur(4)


def test_a_field_the_ops_need_but_the_draw_lacks_is_named(images):
    r = Recipe(lambda rng, n: {"box": draw()(rng, n)["box"]}, [Crop(), Flip(), Normalise()], 2, 13, name="mine")
    ex = TensorExecutor(Split(images=images), r, 16, 0, 0, 1, MEAN, STD)
    with pytest.raises(ValueError, match="mine: its ops read plan field 'flip'"):
        next(iter(ex))
    with pytest.raises(ValueError, match="must be the last op"):
        Recipe(draw(), [Crop(), SplitTargets(LAB), Normalise()], 2, 16)
    ragged = Recipe(draw(ragged=True), [Crop(), Normalise()], 2, 13, name="ragged")
    with pytest.raises(ValueError, match="needs Resize right after Crop"):
        next(iter(TensorExecutor(Split(images=images), ragged, 16, 0, 0, 1, MEAN, STD)))


def test_tensor_executor_resumes_mid_epoch_shards_ranks_and_refuses_files(images):
    r = recipe("hsv")
    split = Split(images=images)
    full = TensorExecutor(split, r, 8, 3, 0, 1, MEAN, STD)
    full.set_epoch(2)
    whole = list(full)
    resumed = TensorExecutor(split, r, 8, 3, 0, 1, MEAN, STD)
    resumed.set_epoch(2, start_step=5)
    tail = list(resumed)
    assert len(tail) == len(whole) - 5 == 3
    for a, b in zip(tail, whole[5:]):
        assert torch.equal(a["index"], b["index"]) and all(torch.equal(u, v) for u, v in zip(a["views"], b["views"]))
    ranks = [TensorExecutor(split, r, 8, 3, k, 2, MEAN, STD) for k in range(2)]
    idx = []
    for e in ranks:
        e.set_epoch(2)
        idx += [b["index"] for b in e]
    idx = torch.cat(idx)
    assert len(idx.unique()) == len(idx) == 64
    with pytest.raises(ValueError, match="folder's images are files"):
        TensorExecutor(Split(files=["a.png"] * 16), r, 8, 3, 0, 1, MEAN, STD)


@pytest.mark.parametrize("stretch", [True, False], ids=["stretch", "no-stretch"])
def test_exemplar_surrogate_recipe_on_every_executor(images, stretch):
    """The surrogate recipe (WarpAffine, ColourMatrix, HSVPower) on its own per-step plan: the
    DataLoader and tensor executors equal the torch faces bit for bit, DALI CPU to one grey level
    (with the default stretch, the authors', and without, the text's)."""
    from fastssl.data.decode import to_chw
    from fastssl.methods.exemplar.surrogate import (
        PatchParams,
        SurrogateAug,
        generate_torch,
        make_surrogate_set,
        pca_basis,
        surrogate_recipe,
    )

    split = Split(images=images)
    sset = make_surrogate_set(split, SIZE, np.arange(16), np.arange(16), 16, seed=0)
    aug = SurrogateAug(stretch=stretch)
    r = surrogate_recipe(sset, aug, 16, SIZE, pca_basis(to_chw(images)), per_class=4)
    for kind, ex in executors(split, r, batch=8).items():
        ex.set_epoch(1)
        plan = ex.epoch_plan(1)
        n = 0
        for k, batch in enumerate(ex):
            s = plan.step(k)
            p = PatchParams(s["affine"][:, 0], s["cmat"][:, 0], s["coff"][:, 0], s["hsvp"][:, 0])
            want = generate_torch(torch.from_numpy(images[s.sources]).permute(0, 3, 1, 2), p, 16, aug)
            got = batch["views"][0]
            assert torch.equal(batch["index"], torch.from_numpy(s.index)) and got.shape == want.shape == (8, 16, 16, 3)
            if kind == "dali-cpu":
                d = (got.int() - want.int()).abs()
                assert d.max() <= 1 and (d > 0).float().mean() < 0.01, (d.max(), (d > 0).float().mean())
            else:
                assert torch.equal(got, want), kind
            n += 1
        assert n == len(ex) == 8


def test_a_flip_before_pointwise_ops_and_normalise_runs_as_its_mirror():
    from fastssl.data.ops.colour import fuse_flip

    fused = fuse_flip(RECIPES["blur-after-resize"][0])
    assert [repr(o) for o in fused] == ["Crop", "Resize", "HSV", "Grey", "Blur(kernel=3)", "Normalise(mirror)"]
    assert fused[-1].reads == ("flip",)
    lab = RECIPES["lab-targets"][0]  # Flip -> ToSpace: not a Normalise, kept as it is
    assert fuse_flip(lab) == lab
