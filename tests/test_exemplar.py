"""Exemplar-CNN: Sobel-weighted anchors, the six transformation families (DALI graph and its
torch twin), surrogate labels, the seed's optimiser groups, clustering on planted clusters,
the fold-SVM protocol on STL-10's fold_indices.txt, materialised sets, and a short run."""

import colorsys
import json
import os

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import PY, ROOT, TINY, dali_patches, read_metrics, run, train_cmd
from fastssl.config import ConfigError, load_config
from fastssl.data.decode import to_chw
from fastssl.methods.exemplar import surrogate as ex

CFG = "configs/exemplar/builtin.yaml"
SMALL = [
    "model.width=8",
    "method.num_classes=64",
    "method.patches_per_class=8",
    "method.val_patches_per_class=2",
    "data.batch_size=32",
]


def run_dali(images, params, patch=32):
    """The DALI graph (CPU backend) on explicit parameters: (n, P, P, 3) uint8."""
    return dali_patches(images, ex.patch_recipe(patch), [params.affine, params.cmat, params.coff, params.hsv])


def both(images, params, patch=32):
    """DALI and torch patches of the same parameters; they must agree to one grey level."""
    d = run_dali(images, params, patch)
    t = ex.generate_torch(to_chw(images), params, patch).numpy()
    diff = np.abs(d.astype(int) - t.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    return d.astype(np.float64)


def params(n, anchors=None, shift=None, scale=1.0, angle=0.0, pca=1.0, hsv=None, size=64, pca_basis=None):
    anchors = np.full((n, 2), size / 2) if anchors is None else anchors
    return ex.make_params(
        anchors,
        np.zeros((n, 2)) if shift is None else shift,
        np.full(n, scale),
        np.full(n, angle),
        np.full((n, 3), pca),
        np.tile(ex.IDENTITY_HSV if hsv is None else hsv, (n, 1)),
        32,
        size,
        pca_basis,
    )


def ramp(size=64, axis=1, slope=2.0, base=40.0):
    v = base + slope * np.arange(size)
    img = np.broadcast_to(v[None, :] if axis == 1 else v[:, None], (size, size))
    return np.repeat(np.round(img)[..., None], 3, 2).astype(np.uint8)


# --------------------------------------------------------------------------- anchors


def test_anchors_follow_the_edge_map():
    """One vertical edge: every anchor lies on it, uniformly along it (chi-square); two edges of
    strengths 1:3 get anchors in that ratio (binomial test)."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 200
    a = ex.sample_anchors(to_chw([img] * 3000), torch.Generator().manual_seed(0)).numpy()
    assert set(np.unique(a[:, 1])) <= {31.5, 32.5}
    counts = np.bincount(a[:, 0].astype(int), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-3
    two = np.zeros((64, 64, 3), np.uint8)
    two[:, 16:] = 50  # step of 50 at x = 16
    two[:, 48:] = 200  # step of 150 at x = 48
    a = ex.sample_anchors(to_chw([two] * 3000), torch.Generator().manual_seed(1)).numpy()
    right = int((a[:, 1] > 40).sum())
    assert set(np.unique(np.round(a[:, 1] - 0.5))) <= {15, 16, 47, 48}
    assert stats.binomtest(right, 3000, 0.75).pvalue > 1e-3
    flat = ex.sample_anchors(to_chw([np.full((16, 16, 3), 9, np.uint8)] * 2000), torch.Generator().manual_seed(2))
    assert len(np.unique(flat.numpy(), axis=0)) > 200  # a flat image: anchors anywhere


# --------------------------------------------------------------------------- transformation families


def test_dali_and_torch_agree_on_random_transformations():
    rng = np.random.default_rng(0)
    imgs = [np.clip(rng.normal(128, 60, (48, 48, 3)), 0, 255).astype(np.uint8) for _ in range(16)]
    imgs = [
        np.asarray(
            torch.nn.functional.avg_pool2d(torch.from_numpy(i).permute(2, 0, 1)[None].float(), 5, 1, 2)[0].permute(
                1, 2, 0
            )
        )
        .round()
        .astype(np.uint8)
        for i in imgs
    ]
    basis = ex.pca_basis(to_chw(imgs))
    anchors = rng.uniform(0, 48, (16, 2))
    p = ex.draw_params(rng, anchors, ex.SurrogateAug(), 32, 48, basis)
    both(imgs, p)


def test_identity_is_the_seed_patch():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    anchors = np.array([[20.0, 30.0], [40.0, 41.0]])  # pixel-centre coordinates: rows 4..35, 14..45
    d = both([img, img], params(2, anchors=anchors))
    assert np.array_equal(d[0], img[4:36, 14:46]) and np.array_equal(d[1], img[24:56, 25:57])


def test_translation_scale_rotation_move_the_patch_as_they_should():
    img = ramp(slope=2.0)  # value = 40 + 2 x
    base = both([img], params(1))[0, ..., 0]
    shifted = both([img], params(1, shift=np.array([[0.0, 5.0]])))[0, ..., 0]
    assert abs((shifted - base).mean() - 10.0) < 0.5  # 5 px right: +10 levels
    gx = lambda p: np.diff(p, axis=1)[4:-4, 4:-4].mean()  # noqa: E731
    assert abs(gx(base) - 2.0) < 0.05
    assert abs(gx(both([img], params(1, scale=0.5))[0, ..., 0]) - 4.0) < 0.1  # twice the window: twice the slope
    assert abs(gx(both([img], params(1, scale=1.4))[0, ..., 0]) - 2.0 / 1.4) < 0.05
    rot = both([img], params(1, angle=20.0))[0, ..., 0]
    gy, gxr = np.diff(rot, axis=0)[4:-4, 4:-4].mean(), np.diff(rot, axis=1)[4:-4, 4:-4].mean()
    # the window turns by +20 degrees, so the content (the ramp's gradient) turns by -20 in the patch
    assert abs(np.degrees(np.arctan2(gy, gxr)) + 20.0) < 1.0 and abs(np.hypot(gy, gxr) - 2.0) < 0.05


def test_pca_contrast_scales_the_pixel_spread():
    rng = np.random.default_rng(2)
    img = np.clip(rng.normal(128, 12, (64, 64, 3)) + rng.normal(0, 12, (64, 64, 1)), 0, 255).astype(np.uint8)
    basis = ex.pca_basis(to_chw([img]))
    base = both([img], params(1, pca_basis=basis))[0]
    for f in (0.5, 2.0):
        out = both([img], params(1, pca=f, pca_basis=basis))[0]
        assert abs(out.std() / base.std() - f) < 0.05 * f
        assert abs(out.mean() - base.mean()) < 1.5  # around the set's mean
    one = np.array([2.0, 1.0, 1.0])  # only the smallest component: the leading one's spread is kept
    p = ex.make_params(
        np.full((1, 2), 32.0), np.zeros((1, 2)), [1.0], [0.0], one[None], ex.IDENTITY_HSV[None], 32, 64, basis
    )
    proj = lambda x: (x.reshape(-1, 3) / 255.0 - basis[0]) @ basis[1]  # noqa: E731
    pb, po = proj(base), proj(both([img], p)[0])
    assert abs(po[:, 0].std() / pb[:, 0].std() - 2.0) < 0.1 and abs(po[:, 2].std() / pb[:, 2].std() - 1.0) < 0.05


def hsv_of(patch):
    return np.array([colorsys.rgb_to_hsv(*(px / 255.0)) for px in patch.reshape(-1, 3)])


def test_saturation_value_and_hue_change_as_they_should():
    rng = np.random.default_rng(3)
    img = np.clip(rng.normal([150, 90, 60], 20, (64, 64, 3)), 0, 255).astype(np.uint8)  # orange-ish
    base = hsv_of(both([img], params(1))[0])
    sq = hsv_of(both([img], params(1, hsv=[2, 1, 0, 1, 1, 0, 0]))[0])  # S^2
    assert np.allclose(sq[:, 1], base[:, 1] ** 2, atol=0.02) and np.allclose(sq[:, 2], base[:, 2], atol=0.01)
    root = hsv_of(both([img], params(1, hsv=[0.5, 1, 0, 1, 1, 0, 0]))[0])
    assert (root[:, 1] > base[:, 1]).mean() > 0.99
    v = hsv_of(both([img], params(1, hsv=[1, 1, 0, 1, 1.2, 0.05, 0]))[0])  # V * 1.2 + 0.05
    assert np.allclose(v[:, 2], np.clip(base[:, 2] * 1.2 + 0.05, 0, 1), atol=0.01)
    assert np.allclose(v[:, 0], base[:, 0], atol=0.02)  # hue kept
    h = hsv_of(both([img], params(1, hsv=[1, 1, 0, 1, 1, 0, 0.1]))[0])
    dh = (h[:, 0] - base[:, 0] + 0.5) % 1.0 - 0.5
    assert abs(np.median(dh) - 0.1) < 0.01 and np.allclose(h[:, 1], base[:, 1], atol=0.02)


# --------------------------------------------------------------------------- labels, groups, config


def test_surrogate_items_and_labels():
    s = ex.SurrogateSet(np.array([5, 9, 2, 7, 3]), np.array([0, 1, 1, 2, 1]), np.zeros((5, 2), np.float32), 4)
    items = s.items(6)
    assert len(items) == 4 * 6
    first = items[:18]  # classes 0, 1, 2 in order, 6 patches each, members in turn
    assert s.labels[first].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert s.members[first[6:12]].tolist() == [9, 2, 3, 9, 2, 3]
    assert set(items[18:]) <= set(first)  # class 3 is empty: the epoch is filled by repetition


def test_loader_delivers_each_class_per_class_times_with_its_label(tiny_cfg):
    from fastssl.data.sources import build_source
    from fastssl.methods.exemplar import ExemplarCNN
    from fastssl.models import build_backbone

    cfg = tiny_cfg(*SMALL, "method.cluster.enabled=false", config=os.path.join(ROOT, CFG))
    src = build_source(cfg)
    m = ExemplarCNN(cfg, build_backbone(cfg.model, src.image_size), src.image_size, len(src.pretrain))
    m.begin_stage(0, src)
    assert sorted(m.sset.members.tolist()) == m.sset.members.tolist() and len(set(m.sset.members)) == 64
    loader = m.loader(cfg, src)
    loader.set_epoch(0)
    seen = []
    for b in loader:
        x, idx = b["views"][0], b["index"]
        assert x.shape == (32, 32, 32, 3) and x.dtype == torch.uint8
        seen.append(m.member_label[idx].numpy())
        out = m(b["views"], idx)
        assert torch.isfinite(out["loss"])
    assert np.array_equal(np.bincount(np.concatenate(seen)), np.full(64, 8))
    std = m.backbone.stem.std.view(-1)
    assert (std > 0.05).all() and (std < 0.5).all()  # normalisation from the surrogate set


def test_exemplar_cnn_is_he_initialised():
    """Every conv/linear weight ~ N(0, 2 / fan_in), biases zero (models.he_init)."""
    from fastssl.models import exemplar_cnn

    torch.manual_seed(0)
    net = exemplar_cnn(16)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 4
    for m in layers:
        fan_in = m.weight[0].numel()
        assert m.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1), m
        assert not m.bias.any()


@pytest.mark.slow
def test_processes_do_not_import_torchvision_unless_a_resnet_is_built():
    """torchvision (and the torch._dynamo it pulls in) costs ~1.2 s per train/eval process."""
    code = (
        "import sys; import fastssl.train, fastssl.eval.__main__, fastssl.methods.exemplar; "
        "from fastssl.models import exemplar_cnn, convnet; exemplar_cnn(8); convnet(8); "
        "assert 'torchvision' not in sys.modules; "
        "from fastssl.models import resnet; resnet('resnet18', True); assert 'torchvision' in sys.modules"
    )
    run([PY, "-c", code])


def test_optimiser_groups_and_schedule_carry_the_seed_values():
    from fastssl.data.sources import build_source
    from fastssl.engine.optim import build_optimizer, lr_factor
    from fastssl.methods.exemplar import ExemplarCNN
    from fastssl.models import build_backbone

    cfg = load_config(
        os.path.join(ROOT, "configs/exemplar/stl10.yaml"),
        ["data.source=builtin", "data.path=null", "method.num_classes=100", "model.width=8"],
    )
    src = build_source(cfg)
    m = ExemplarCNN(cfg, build_backbone(cfg.model, src.image_size), src.image_size, len(src.pretrain))
    opt, _ = build_optimizer(cfg, m, 128, torch.device("cpu"))
    g = {x["name"]: x for x in opt.param_groups}
    assert (g["weights"]["lr"], g["biases"]["lr"], g["fc1"]["lr"], g["fc2"]["lr"]) == pytest.approx(
        (0.1, 0.2, 0.1, 0.025)
    )
    assert (g["weights"]["weight_decay"], g["biases"]["weight_decay"]) == (0.0, 0.0)
    assert (g["fc1"]["weight_decay"], g["fc2"]["weight_decay"]) == pytest.approx((0.004, 0.016))
    assert g["fc2"]["params"][0] is m.classifier.weight and g["fc1"]["params"][0].shape == (16 * 8, 8 * 8 * 49)
    convs = [mod.weight for mod in m.backbone.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert {id(p) for p in convs} <= {id(p) for p in g["weights"]["params"]}
    assert sum(len(x["params"]) for x in opt.param_groups) == len(list(m.parameters()))
    assert opt.defaults["momentum"] == 0.9
    f = [lr_factor(cfg, e * 10, 10) for e in (0, 74, 75, 85, 92, 100, 109)]
    assert f == pytest.approx([1, 1, 0.4, 0.1, 0.04, 0.01, 0.01])
    assert cfg.train.epochs == 110


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.arch=convnet", "model.arch"),
        ("method.num_classes=100000", "method.num_classes"),
        ("method.aug.scale=[0,2]", "method.aug.scale"),
        ("method.aug.hue=0.7", "method.aug.hue"),
        ("method.cluster.enabled=true method.cluster.fraction=1.0", "method.cluster.fraction"),  # (read when on)
        ("method.cluster.enabled=true method.cluster.max_size=1", "method.cluster.max_size"),
        ("optim.schedule=step optim.gammas=[0.5]", "optim.gammas"),  # (read by the step schedule)
        ("method.surrogate_dir=/nonexistent", "method.surrogate_dir"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(os.path.join(ROOT, CFG), ["method.cluster.enabled=false", *override.split()])


# --------------------------------------------------------------------------- clustering


def planted(seed=0, d=32):
    """40 tight clusters of 2-6 points far apart + 60 isolated points (clustered half); and for
    every isolated point 3 close held-out points (held-out half) plus 50 far ones."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    a, truth = [], []
    for c in range(40):
        for _ in range(rng.integers(2, 7)):
            a.append(centres[c] + rng.normal(0, 0.02, d))
            truth.append(c)
    singles = list(range(len(a), len(a) + 60))
    a.extend(centres[40:])
    truth.extend(range(40, 100))
    b = [centres[40 + i // 3] + rng.normal(0, 0.05, d) for i in range(180)] + list(rng.normal(size=(50, d)) * 3)
    return np.array(a), np.array(truth), singles, np.array(b)


@pytest.mark.parametrize("max_images", [20000, 60])
def test_clustering_recovers_planted_clusters_and_joins_neighbours(max_images):
    from fastssl.methods.exemplar.cluster import merge_classes

    a, truth, singles, b = planted()
    classes, summary = merge_classes(a, b, budget=100, threshold=0.5, neighbours=3, max_images=max_images)
    multi = [sorted(r for w, r in c) for c in classes if all(w == "a" for w, _ in c) and len(c) > 1]
    want = sorted(sorted(np.flatnonzero(truth == c).tolist()) for c in range(40))
    assert sorted(multi) == want and summary["clusters"] == 40
    joined = [c for c in classes if c[0][0] == "a" and c[0][1] in singles]
    assert len(joined) == 60 and summary["classes"] == 100
    for c in joined:
        k = truth[c[0][1]] - 40
        assert sorted(r for w, r in c[1:]) == [3 * k, 3 * k + 1, 3 * k + 2]  # its own 3 planted neighbours
    small, s2 = merge_classes(a, b, budget=25, threshold=0.5)
    assert len(small) == 25 and s2["singles"] == 0  # the budget caps the classes (largest clusters first)


def same_partition(a, b):
    """Two label vectors describe the same grouping (labels may be numbered differently)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_tree_cut_equals_scikit_learn_and_the_size_cap_splits_a_loose_cut():
    from scipy.spatial.distance import pdist, squareform
    from sklearn.cluster import AgglomerativeClustering

    from fastssl.methods.exemplar.cluster import complete_linkage

    x = np.abs(np.random.default_rng(3).normal(size=(301, 16)))  # non-negative, like ReLU features
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = squareform(pdist(x))
    thr = float(np.quantile(d[np.triu_indices(len(x), 1)], 0.02))
    for t in (thr, 1.25):
        ref = AgglomerativeClustering(n_clusters=None, distance_threshold=t, linkage="complete").fit_predict(x)
        assert same_partition(complete_linkage(x, t), ref)
    loose = complete_linkage(x, 1.25)
    assert np.bincount(loose).max() > 100  # every distance is below 1.25: a few huge clusters
    capped = complete_linkage(x, 1.25, max_size=7)
    sizes = np.bincount(capped)
    assert sizes.max() <= 7 and (sizes >= 2).sum() > 30
    for c in np.flatnonzero(sizes >= 2):
        rows = np.flatnonzero(capped == c)
        assert d[np.ix_(rows, rows)].max() < 1.25
        assert len(set(loose[rows].tolist())) == 1  # a refinement of the uncapped cut


# --------------------------------------------------------------------------- svm-folds


def test_svm_folds_reads_the_stl10_fold_file(tmp_path):
    from fastssl.data.sources import build_source
    from fastssl.eval.__main__ import evaluate
    from fastssl.eval.svm import eval_folds
    from formats import write_stl10

    root = tmp_path / "stl10_binary"
    ref = write_stl10(str(root), n_unl=4, n_train=40, n_test=12, seed=3)
    with open(root / "fold_indices.txt", "w") as f:  # 10 folds of 20 (0-based indices, as STL-10 ships them)
        folds = [np.random.default_rng(k).permutation(40)[:20] for k in range(10)]
        for fo in folds:
            f.write(" ".join(map(str, fo)) + " \n")
    cfg = load_config(
        os.path.join(ROOT, CFG),
        [
            "data.source=stl10",
            f"data.path={root}",
            "method.num_classes=8",
            "method.cluster.enabled=false",
            "data.batch_size=8",
            "model.width=4",
        ],
    )
    src = build_source(cfg)
    got = eval_folds(src, 3, 5)
    assert len(got) == 10 and all(np.array_equal(g, w) for g, w in zip(got, folds))
    res = evaluate(cfg, "svm-folds", None, torch.device("cpu"), log=lambda *a: None)
    assert res["fold_sizes"] == [20] * 10 and len(res["runs"]) == 10
    assert res["std"] == pytest.approx(np.std(res["runs"]))
    assert all(0 <= r <= 100 for r in res["runs"]) and len(set(res["runs"])) > 1  # the folds differ
    builtin = load_config(os.path.join(ROOT, CFG), [*TINY, *SMALL, "eval.svm_folds=4", "eval.svm_fold_size=50"])
    rnd = eval_folds(build_source(builtin), 4, 50, seed=0)
    assert [len(r) for r in rnd] == [50] * 4 and all(len(set(r)) == 50 for r in rnd)
    assert ref["train"].shape[0] == 40


# --------------------------------------------------------------------------- materialised set, run


@pytest.mark.slow
def test_materialise_then_train_from_the_file(tmp_path):
    out = tmp_path / "surrogate"
    p = run([PY, "-m", "fastssl.materialise", "--config", CFG, "--out", str(out), *TINY, *SMALL])
    assert p.stdout.startswith("fastssl.materialise: 512 patches of 64 classes"), p.stdout  # (the tool's name)
    meta = json.load(open(out / "meta.json"))
    patches = np.load(out / "patches.npy", mmap_mode="r")
    assert meta["patches"] == len(patches) == 64 * 8 and patches.shape[1:] == (32, 32, 3)
    rows = np.load(out / "rows.npy")
    st = torch.load(out / "surrogate_set.pt", weights_only=True)
    assert np.array_equal(np.bincount(st["labels"].numpy()[rows]), np.full(64, 8))
    from fastssl.data.sources import build_source
    from fastssl.methods.exemplar import seed_surrogate_set

    cfg = load_config(os.path.join(ROOT, CFG), [*TINY, *SMALL])
    _, basis = seed_surrogate_set(cfg, build_source(cfg))  # the basis the patches were made with is stored
    assert np.allclose(st["pca_mean"].numpy(), basis[0]) and np.allclose(st["pca_vecs"].numpy(), basis[1])
    run(
        train_cmd(
            tmp_path / "run",
            *SMALL,
            "method.cluster.enabled=false",
            f"method.surrogate_dir={out}",
            "train.epochs=1",
            config=CFG,
        )
    )
    log = read_metrics(tmp_path / "run")
    steps = [r for r in log if "loss" in r]  # (the first record is the monitor's untrained level)
    assert any("val_acc" in r for r in log) and steps[0]["loss"] == pytest.approx(np.log(64), abs=0.3)


@pytest.mark.slow
def test_train_cluster_retrain_and_resume_bit_exactly_across_the_clustering(tmp_path):
    """Stage 1 trains, the clustering re-forms the classes, stage 2 retrains from scratch; a run
    SIGKILLed in stage 2 and resumed ends with the reference's weights and surrogate set."""
    from conftest import kill_and_resume

    common = [
        *SMALL,
        "method.cluster.enabled=true",
        "method.cluster.threshold=0.6",
        "train.epochs=1",
        "train.ckpt_every_steps=4",
        "data.pipeline=dali-cpu",
    ]
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, CFG, (19, 30))
    # the last checkpoint at or before the kill (a kill at a checkpoint step comes after its save)
    assert ref["step"] == resumed["step"] == 32 and crashed["step"] == kill_at - kill_at % 4
    for k, v in ref["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed["model"][k]), k
    s_ref, s_res = ref["model"]["_extra_state"], resumed["model"]["_extra_state"]
    assert s_ref["clustered"] and s_res["clustered"]
    assert all(torch.equal(s_ref["sset"][k], s_res["sset"][k]) for k in ("members", "labels", "anchors"))
    assert len(s_ref["sset"]["members"]) > 64 // 2  # the merged classes hold clustered and held-out images


@pytest.mark.slow
def test_resume_from_the_checkpoint_written_as_the_second_stage_began(tmp_path):
    """Killed after the checkpoint written at stage 2's start (step 16) and before the next one
    (step 20), the resumed run restores the RNG before stage 2 re-initialises the network, as the
    uninterrupted run drew it (it restored it after, so the weights differed)."""
    from conftest import kill_and_resume

    common = [
        *SMALL,
        "method.cluster.enabled=true",
        "method.cluster.threshold=0.6",
        "train.epochs=1",
        "train.ckpt_every_steps=4",
        "data.pipeline=torch",
    ]
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, CFG, (18, 19))
    assert kill_at == 18 and crashed["step"] == 16 and "optimizer" not in crashed
    for k, v in ref["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.slow
@pytest.mark.learning
def test_builtin_learn_run_trains_clusters_retrains_and_beats_random_init(tmp_path):
    """configs/exemplar/builtin-learn.yaml: stage 1 learns its 64 surrogate classes, the clustering
    re-forms them from several images each, stage 2 learns those from scratch, and the final
    network beats the same network untrained under svm-folds (3 folds of 1,000 images)."""
    from conftest import eval_trained_and_random, load_ckpt

    out = tmp_path / "learn"
    proc = run(train_cmd(out, config="configs/exemplar/builtin-learn.yaml", tiny=False), timeout=1200)
    log = read_metrics(out)
    val = [r["val_acc"] for r in log if "val_acc" in r]  # surrogate accuracy, 10 epochs per stage
    assert len(val) == 20 and max(val[7:10]) >= 30 and max(val[17:]) >= 20, val  # chance: 1.6%
    assert "fastssl: exemplar clustering:" in proc.stderr
    sset = load_ckpt(out / "checkpoints" / "last.pt")["model"]["_extra_state"]["sset"]
    sizes = np.bincount(sset["labels"].numpy(), minlength=64)
    assert sizes.min() >= 2 and sizes.max() <= 7  # every class is a cluster of 2-7 images
    trained, random = eval_trained_and_random(out, "svm-folds")
    # The same code gave 30.6% in an earlier session and gives 26.8% +- 0.9 today, here (a 2-core
    # AMD EPYC) and in CI, with 22.0% +- 0.3 untrained each time: the machine's float rounding
    # moves 640 steps of training by ~4 points. 3 points is over 3 fold-stds in both.
    assert trained["accuracy"] >= random["accuracy"] + 3, (trained, random)


@pytest.mark.slow
def test_torch_pipeline_resumes_bit_exactly_after_a_kill_mid_epoch(tmp_path):
    """data.pipeline=torch (DataLoader worker processes), killed mid-epoch between two checkpoints
    and resumed: the same weights as the uninterrupted run.  dali-cpu always did; on the torch
    executor the DataLoader drew its workers' seed from torch's global RNG when an epoch's
    iterator started, so a resumed run drew it again after restoring the RNG and its dropout
    masks differed from the first step after the checkpoint on (fixed and per_epoch surrogate sets
    alike; in any epoch)."""
    from conftest import kill_and_resume

    common = [
        *SMALL,
        "method.cluster.enabled=false",
        "train.epochs=1",
        "train.ckpt_every_steps=5",
        "data.pipeline=torch",
        "data.num_workers=2",
    ]
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, CFG, (12, 14))
    assert ref["step"] == resumed["step"] == 16 and crashed["step"] == 10 and crashed["step_in_epoch"] == 10
    for k, v in ref["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed["model"][k]), k
