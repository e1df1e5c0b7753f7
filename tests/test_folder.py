"""Folders at scale: crops over each whole image (ROI decoding), files read by worker processes
in the plan's order, exact resume, and one data check per run (cached, shared by ranks)."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run, train_cmd
from fastssl.config import load_config
from fastssl.data import check
from fastssl.data.executors.dali import DaliExecutor, FileReader
from fastssl.data.executors.dataloader import TorchExecutor
from fastssl.data.plan import epoch_order, frame_shapes, to_image_boxes, union_roi
from fastssl.data.sources import build_source
from fastssl.methods import get_method
from fastssl.models import build_backbone

MARK = (255, 0, 0)
MK = 20  # marker side, px


def write_sized_folder(root, n_per_class=10, seed=0, ext="png", marker=False):
    """Class folders of smooth images of varied sizes (40-110 px each side); ``marker``: a red
    MK x MK square in each image's top-right corner (nothing else is saturated red)."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, "train", c), exist_ok=True)
        for i in range(n_per_class):
            h, w = (int(v) for v in rng.integers(40, 110, 2))
            coarse = Image.fromarray(rng.integers(60, 200, (3, 3, 3), dtype=np.uint8))
            arr = np.array(coarse.resize((w, h), Image.BILINEAR))
            if marker:
                arr[:MK, -MK:] = MARK
            Image.fromarray(arr).save(os.path.join(root, "train", c, f"{i:02d}.{ext}"))
    return root


def method_loader(name, root, pipeline, *overrides):
    cfg = load_config(
        f"{ROOT}/configs/{name}/builtin.yaml",
        [
            "data.source=folder",
            f"data.path={root}",
            "data.image_size=48",
            "data.batch_size=4",
            f"data.pipeline={pipeline}",
            "data.num_workers=1",
            *overrides,
        ],
    )
    src = build_source(cfg)
    m = get_method(name)(cfg, build_backbone(cfg.model, src.image_size), src.image_size, len(src.pretrain))
    m.begin_stage(0, src)
    return m.loader(cfg, src, 0, 1, None, "cpu"), src


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))


def test_frames_image_boxes_and_regions():
    sizes = np.array([[60, 120], [300, 200], [48, 48]])
    np.testing.assert_array_equal(frame_shapes(sizes, 48), [[48, 96], [72, 48], [48, 48]])
    box = np.array(
        [[[0, 48, 48, 48], [0, 0, 24, 24]], [[24, 0, 48, 48], [0, 0, 72, 48]], [[10, 10, 20, 20], [0, 0, 48, 48]]]
    )
    img = to_image_boxes(box, sizes, 48)
    # 1.25 image px per frame px; the right half of a 2:1 image is its right half
    np.testing.assert_array_equal(img[0], [[0, 60, 60, 60], [0, 0, 30, 30]])
    np.testing.assert_array_equal(img[1, 1], [0, 0, 300, 200])  # the whole frame is the whole image
    np.testing.assert_array_equal(img[2], box[2])  # an image of the frame's size: unchanged
    assert ((img[..., :2] + img[..., 2:]) <= sizes[:, None]).all()
    roi, rel = union_roi(img)
    np.testing.assert_array_equal(roi[0], [0, 0, 60, 120])
    np.testing.assert_array_equal(rel[0], [[0, 60, 60, 60], [0, 0, 30, 30]])
    np.testing.assert_array_equal(roi[2], [0, 0, 48, 48])
    np.testing.assert_array_equal(rel[2, 0], [10, 10, 20, 20])


def test_reader_follows_the_plan_order_across_epochs_and_resume(tmp_path):
    files = [str(tmp_path / f"{i}.bin") for i in range(13)]
    for i, f in enumerate(files):
        np.full(i + 1, i, np.uint8).tofile(f)

    class Info:
        def __init__(self, epoch_idx, iteration, j):
            self.epoch_idx, self.iteration, self.idx_in_batch = epoch_idx, iteration, j

    for rank in (0, 1):
        r = FileReader(files, 3, seed=7, rank=rank, world=2, epoch=4, start_step=1)
        for e_idx, first in ((0, 1), (1, 0)):  # the first pass starts at the resume step
            take = epoch_order(13, 3, 7, 4 + e_idx, rank, 2)[1]
            got = [int(r(Info(e_idx, k - first, j))[0]) for k in range(first, 2) for j in range(3)]
            assert got == list(take[first * 3 :])
            with pytest.raises(StopIteration):
                r(Info(e_idx, 2 - first, 0))


@pytest.mark.parametrize("pipeline", ["dali-cpu", "torch"])
def test_crops_cover_the_whole_image_a_corner_marker_is_seen(tmp_path, pipeline):
    """A red marker in each image's top-right corner (outside the centre square of every
    landscape image) appears in exactly the crops whose boxes cover it."""
    root = write_sized_folder(tmp_path / "data", n_per_class=30, marker=True)
    loader, src = method_loader(
        "invp",
        root,
        pipeline,
        "method.grayscale=0",
        "method.crop_scale=[0.02,0.06]",
        "method.color.hue=0",
        "method.color.saturation=[1,1]",
        "method.color.value=[1,1]",
    )
    assert loader.whole
    seen = covered = outside_centre = 0
    for epoch in range(8):
        loader.set_epoch(epoch)
        plan = loader.epoch_plan(epoch)
        for k, b in enumerate(loader):
            step = plan.step(k)
            x = b["views"][0] * torch.tensor(src.std).view(1, 3, 1, 1) + torch.tensor(src.mean).view(1, 3, 1, 1)
            red = ((x[:, 0] > 0.9) & (x[:, 1] < 0.15) & (x[:, 2] < 0.15)).flatten(1).float().mean(1)
            for j, i in enumerate(step.sources):
                h, w = src.pretrain.sizes[i]
                y0, x0, bh, bw = step["box"][j, 0]
                inside = y0 + bh <= MK - 1 and x0 >= w - MK + 1  # the box lies inside the marker: all red
                overlap_px = max(0, min(y0 + bh, MK) - y0) * max(0, x0 + bw - max(x0, w - MK))
                if w > h and x0 + bw > (w + h) / 2 + 2:
                    outside_centre += 1  # part of the box right of the centre square
                if inside:
                    covered += 1
                    assert red[j] > 0.8, (i, step["box"][j, 0], red[j])
                if overlap_px == 0:
                    assert red[j] < 0.02, (i, step["box"][j, 0], red[j])
                seen += red[j] > 0.05
    assert seen > 0 and covered > 0 and outside_centre > 0, (seen, covered, outside_centre)


@pytest.mark.parametrize("name", ["sc", "invp", "layerwise", "splitbrain"])
def test_dali_and_dataloader_cut_the_same_regions(tmp_path, name):
    """Every crop recipe on a folder of varied sizes: DALI's ROI decode + resize equals PIL + crop +
    torchvision's resize (PNG: the same pixels decoded; only the resampling filters differ)."""
    root = write_sized_folder(tmp_path / "data")
    dali, _ = method_loader(name, root, "dali-cpu")
    tv, _ = method_loader(name, root, "torch")
    assert isinstance(dali, DaliExecutor) and isinstance(tv, TorchExecutor) and dali.whole and tv.whole
    dali.set_epoch(1)
    tv.set_epoch(1)
    n = 0
    for a, b in zip(dali, tv):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"]):
            assert va.shape == vb.shape
            d = (va.float() - vb.float()).abs().mean()
            assert d < (0.05 if va.is_floating_point() else 0.1), d  # a misplaced box differs by ~0.5
        n += 1
    assert n == len(dali) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_resume_mid_epoch_is_exact(tmp_path, workers):
    """A loader started at (epoch 1, step 2) yields exactly the batches the uninterrupted loader
    yields from there, and then the next epoch (files read by worker processes or the main thread)."""
    root = write_sized_folder(tmp_path / "data", ext="jpg")
    full, _ = method_loader("sc", root, "dali-cpu", f"data.reader_workers={workers}")
    assert full.parallel == (workers > 0)
    full.set_epoch(1)
    ref = [b for b in full]
    full.set_epoch(2)
    ref_next = [b for b in full]
    resumed, _ = method_loader("sc", root, "dali-cpu", f"data.reader_workers={workers}")
    resumed.set_epoch(1, start_step=2)
    got = [b for b in resumed]
    resumed.set_epoch(2)
    got_next = [b for b in resumed]
    assert len(got) == len(ref) - 2 and len(got_next) == len(ref_next)
    for a, b in zip(got + got_next, ref[2:] + ref_next):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"]):
            assert torch.equal(va, vb)


def test_check_decodes_only_changed_files_and_memoises(tmp_path):
    root = write_sized_folder(tmp_path / "data", n_per_class=5, ext="jpg")
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.jpg"))
    (tmp_path / "data/train/a/bad.jpg").write_text("not a jpeg")
    files.append(str(tmp_path / "data/train/a/bad.jpg"))
    v = check.check_files(files, str(root))
    assert v.decoded == 11 and v.bad == {files[-1]: "not an image (unrecognised content)"}
    with Image.open(files[0]) as im:
        assert tuple(v.hw[0]) == (im.height, im.width)
    assert check.check_files(files, str(root)) is v  # one check per run in a process
    check._MEMO.clear()
    again = check.check_files(files, str(root))
    assert again.decoded == 0 and np.array_equal(again.code, v.code) and np.array_equal(again.hw, v.hw)
    check._MEMO.clear()
    Image.new("RGB", (30, 20)).save(files[3], format="JPEG")
    changed = check.check_files(files, str(root))
    assert changed.decoded == 1 and tuple(changed.hw[3]) == (20, 30) and changed.bad == v.bad


def test_a_waiting_rank_reads_rank_zeros_verdicts(tmp_path, monkeypatch):
    """Local rank 1 decodes nothing: it waits for local rank 0's cache of exactly these files."""
    root = write_sized_folder(tmp_path / "data", n_per_class=3)
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    code = (
        "import sys; from fastssl.data.check import check_files; "
        f"v = check_files({files!r}, {str(root)!r}); print('decoded', v.decoded, v.hw.tolist())"
    )
    env = {"FASTSSL_CACHE": str(tmp_path / "cache"), "LOCAL_WORLD_SIZE": "2"}
    import subprocess

    from conftest import env as base_env

    waiting = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base_env(), **env, "LOCAL_RANK": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = run([sys.executable, "-c", code], env_extra={**env, "LOCAL_RANK": "0"})
    out, _ = waiting.communicate(timeout=120)
    assert first.stdout.startswith("decoded 6 ")
    assert out.startswith("decoded 0 ") and out.split(" ", 2)[2] == first.stdout.split(" ", 2)[2]


@pytest.mark.ddp
def test_two_rank_run_checks_the_folder_once(tmp_path):
    """torchrun with 2 processes on a folder: validation, training and both ranks share one check."""
    root = write_sized_folder(tmp_path / "data", n_per_class=12, ext="jpg")
    p = run(
        train_cmd(
            tmp_path / "run",
            "data.source=folder",
            f"data.path={root}",
            "data.image_size=32",
            "data.batch_size=4",
            "train.epochs=1",
            "data.split=train",
            nproc=2,
        ),
        env_extra={"FASTSSL_CACHE": str(tmp_path / "cache")},
    )
    log = p.stdout + p.stderr
    assert log.count("fastssl: data check:") == 1 and "decoded 24 of 24 images" in log, log[-3000:]
    assert len(list((tmp_path / "cache").glob("check-*.npz"))) == 1
