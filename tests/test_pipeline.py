"""The DALI executor (CPU backend here) cuts exactly what the torchvision baseline cuts."""

import numpy as np
import pytest
import torch

from fastssl.data.executors.dali import DaliExecutor
from fastssl.data.executors.dataloader import TorchExecutor
from fastssl.data.ops import HSV, Crop, Flip, Normalise, Resize
from fastssl.data.plan import ColorJitter, draw_hsv, make_epoch_plan
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split, make_builtin


def plan_fn(p=13, size=24, jitter=ColorJitter()):
    def f(rng, n):
        yx = rng.integers(0, size - p + 1, size=(n, 2, 2), dtype=np.int32)
        boxes = np.concatenate([yx, np.full((n, 2, 2), p, np.int32)], 2)
        return {"box": boxes, "flip": rng.integers(0, 2, (n, 2), dtype=np.uint8), "hsv": draw_hsv(rng, n, 2, jitter)}

    return f


def loaders(split, fn, color=False, batch_size=16, rank=0, world=1, num_views=2, resize=False, out_size=13):
    recipe = Recipe(
        fn, [Crop()] + [Resize()] * resize + [Flip()] + [HSV()] * color + [Normalise()], num_views, out_size
    )
    common = dict(
        split=split,
        recipe=recipe,
        batch_size=batch_size,
        seed=7,
        rank=rank,
        world=world,
        base_size=24,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
    )
    return DaliExecutor(**common, device="cpu", num_threads=1), TorchExecutor(**common, num_workers=0)


@pytest.fixture(scope="module")
def images():
    x, _ = make_builtin(100, 24, 10, seed=0)
    return x


@pytest.mark.parametrize("color", [False, True])
def test_dali_cpu_equals_torchvision(images, color):
    jitter = ColorJitter(hue=180, saturation=[0.0, 1.5], value=[0.6, 1.4]) if color else ColorJitter()
    dali, tv = loaders(Split(images=images), plan_fn(jitter=jitter), color=color)
    for epoch in range(2):
        dali.set_epoch(epoch)
        tv.set_epoch(epoch)
        n = 0
        for a, b in zip(dali, tv):
            assert torch.equal(a["index"], b["index"])
            for va, vb in zip(a["views"], b["views"]):
                assert va.shape == vb.shape == (16, 3, 13, 13)
                torch.testing.assert_close(va, vb, atol=1e-4 if color else 1e-6, rtol=0)
            n += 1
        assert n == len(dali) == 6


def test_crops_are_the_planned_pixels(images):
    """Independently of both executors: view = normalised image[y:y+h, x:x+w] (flipped if planned)."""
    dali, _ = loaders(Split(images=images), plan_fn())
    dali.set_epoch(0)
    plan = make_epoch_plan(100, 16, plan_fn(), 7, 0)
    batch = next(iter(dali))
    s = plan.step(0)
    idx, boxes, flips = s.index, s["box"], s["flip"]
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    for j in (0, 5, 15):
        for v in range(2):
            y, x, h, w = boxes[j, v]
            crop = images[idx[j], y : y + h, x : x + w].astype(np.float64) / 255
            if flips[j, v]:
                crop = crop[:, ::-1]
            want = ((crop - mean) / std).transpose(2, 0, 1)
            np.testing.assert_allclose(batch["views"][v][j].numpy(), want, atol=1e-5)


def test_epochs_differ_and_resume_mid_epoch_matches(images):
    split = Split(images=images)
    full, _ = loaders(split, plan_fn())
    full.set_epoch(0)
    e0 = [b["index"] for b in full]
    full.set_epoch(1)
    e1 = [b["index"] for b in full]
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    resumed, tv = loaders(split, plan_fn())
    resumed.set_epoch(1, start_step=4)
    tv.set_epoch(1, start_step=4)
    tail = [b["index"] for b in resumed]
    assert len(tail) == 2
    for a, b, c in zip(tail, e1[4:], [b["index"] for b in tv]):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="whole epochs in order"):
        resumed.set_epoch(5)


def test_ranks_take_disjoint_shards():
    n, b, world = 100, 8, 3
    plans = [make_epoch_plan(n, b, plan_fn(), 1, 0, r, world) for r in range(world)]
    idx = np.concatenate([p.index for p in plans])
    assert all(p.steps == n // (b * world) for p in plans)
    assert len(np.unique(idx)) == len(idx) == (n // (b * world)) * b * world
    # a rank's crops do not depend on the world size
    single = make_epoch_plan(n, b, plan_fn(), 1, 0, 0, 1)
    pos = {int(i): k for k, i in enumerate(single.index)}
    for p in plans:
        for k, i in enumerate(p.index):
            if int(i) in pos:
                np.testing.assert_array_equal(p["box"][k], single["box"][pos[int(i)]])


def test_folder_jpegs_through_dali_decoder(tmp_path):
    """Encoded files: DALI's decoder + resize vs PIL + torchvision resize (codecs differ slightly)."""
    from formats import write_folder

    files = write_folder(tmp_path / "imgs", per_class=4, size=(36, 30), smooth=True)
    split = Split(files=[p for p, _ in files if p.endswith(".png")])  # lossless: same pixels in both
    dali, tv = loaders(split, plan_fn(), batch_size=2)
    dali.set_epoch(0)
    tv.set_epoch(0)
    for a, b in zip(dali, tv):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"]):
            assert va.shape == vb.shape
            assert (va - vb).abs().mean() < 0.12  # resampling filters and crop rounding differ; a wrong image is ~0.8


def test_resized_non_square_crops_match_torchvision(images):
    """Random-resized-crop recipes: non-square boxes resized to the view size (DALI vs torchvision)."""

    def fn(rng, n):
        h = rng.integers(6, 24, (n, 1))
        w = rng.integers(6, 24, (n, 1))
        y = (rng.random((n, 1)) * (24 - h + 1)).astype(np.int64)
        x = (rng.random((n, 1)) * (24 - w + 1)).astype(np.int64)
        boxes = np.stack([y, x, h, w], 2).astype(np.int32)
        return {
            "box": boxes,
            "flip": rng.integers(0, 2, (n, 1), dtype=np.uint8),
            "hsv": draw_hsv(rng, n, 1, ColorJitter()),
        }

    dali, tv = loaders(Split(images=images), fn, num_views=1, resize=True, out_size=16)
    dali.set_epoch(0)
    tv.set_epoch(0)
    for a, b in zip(dali, tv):
        va, vb = a["views"][0], b["views"][0]
        assert va.shape == vb.shape == (16, 3, 16, 16)
        # resampling kernels differ slightly; a transposed or misplaced box would differ by ~1
        assert (va - vb).abs().mean() < 0.05, (va - vb).abs().mean()
