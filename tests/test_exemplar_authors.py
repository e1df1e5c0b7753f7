"""Exemplar-CNN's authors' modes against transcriptions of the authors' code.

The authors' code is the repository EricArazo/ExemplarCNN.  Each transcription below names its
file and function there.  Where the computation is deterministic given the drawn parameters
(the PCA of a patch's own pixels, the stretch, the flip, the shared S/V power, the clustering
and SVM features) fastssl's faces are compared with it on identical inputs (float32 values
within 1e-5); where only the draw can match (numpy's global RNG there, a seeded Generator
here), the distributions are compared (ranges, shares, KS tests).  Then the fixed surrogate
set (the same patches every epoch and across a kill-and-resume), the refusals of bad values,
and a short run with every authors' switch on.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import ROOT, dali_patches, kill_and_resume, read_metrics, run, train_cmd
from fastssl.config import ConfigError, load_config
from fastssl.data.decode import to_chw
from fastssl.methods.exemplar import surrogate as ex
from fastssl.methods.exemplar.ops import _TORCH_OPS, hsv_adjust, patch_pca, stretch_torch

CFG = "configs/exemplar/builtin.yaml"
SMALL = [
    "model.width=8",
    "method.num_classes=64",
    "method.patches_per_class=8",
    "method.val_patches_per_class=2",
    "data.batch_size=32",
]
AUTHORS_AUG = ["method.aug.flip=0.5", "method.aug.sv_shared=true", "method.aug.draw=uniform", "method.aug.stretch=true"]
AUTHORS = [
    *AUTHORS_AUG,
    "method.aug.pca_basis=patch",
    "method.surrogate=fixed",
    "method.dropout=authors",
    "method.l2_conv3=0.001",
    "data.pipeline=torch",
]


def aug(**kw):
    return ex.SurrogateAug(**kw)


# the switches on the paper text's side (the defaults are the authors', where the text is silent)
TEXT = dict(flip=0.0, sv_shared=False, draw="loguniform", stretch=False)


# --------------------------------------------------------------------------- transcriptions
# EricArazo/ExemplarCNN, transformations.py


def authors_pca_rand_always(im01, ch):
    """transformations.py, PCA_rand_always.__call__ with PCA.fit/transform/inverse_transform:
    ``im01`` (H, W, 3) on [0, 1] (their ``np.asarray(image)/255.0``), ``ch`` the three factors
    (their ch1..ch3 = np.random.uniform(*mult)); returns (before the stretch, the stretched)."""
    mean = im01.mean(axis=0)  # PCA.fit: X_input.mean(axis=0) -- per column of the HWC patch
    X = np.reshape(im01 - mean, (im01.shape[0] * im01.shape[1], im01.shape[2]))
    vals, vecs = np.linalg.eig(np.dot(X.T, X))
    idx = np.argsort(-vals)
    comps = vecs[:, idx][:, :3]
    im_pca = np.dot(im01 - mean, comps)  # PCA.transform
    im_pca_tf = np.stack((im_pca[:, :, 0] * ch[0], im_pca[:, :, 1] * ch[1], im_pca[:, :, 2] * ch[2]), axis=2)
    im_end = np.dot(im_pca_tf, comps.T) + mean  # PCA.inverse_transform
    return im_end, authors_stretch(im_end)


def authors_stretch(im):
    """The "Postprocessing to avoid saturating pixels" of PCA_rand_always, HSV_contrast_2 and
    HSV_color: im - im.min(), then / its max (over every pixel and channel of the patch)."""
    im_end = im - im.min()
    return im_end / im_end.max()


def rgb2hsv(rgb):
    """skimage.color.rgb2hsv (which the authors call), transcribed for the float patches here."""
    out = np.empty_like(rgb)
    v = rgb.max(-1)
    delta = rgb.max(-1) - rgb.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(v == 0, 0, delta / v)
        h = np.zeros_like(v)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        h = np.where(r == v, (g - b) / delta, h)
        h = np.where(g == v, 2.0 + (b - r) / delta, h)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
        h = (h / 6.0) % 1.0
    h[delta == 0] = 0
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


def hsv2rgb(hsv):
    """skimage.color.hsv2rgb, transcribed; the sector is taken mod 6 on the floor (skimage casts
    a negative floor to uint8 first: a hue shifted below 0 lands in sector 3 there, see
    docs/fidelity.md), and s, v are used unclipped, as there."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = (hi % 6).astype(int)
    sel = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (a, b, c) in enumerate(sel):
        m = hi == k
        out[m, 0], out[m, 1], out[m, 2] = a[m], b[m], c[m]
    return out


def authors_hsv_contrast_2(im01, power, factor, addition):
    """transformations.py, HSV_contrast_2.__call__: ONE power, factor and addition for both S and
    V (``x**power * factor + addition``, not clipped), back to RGB, stretched."""
    hsv = rgb2hsv(im01)
    hsv[..., 1] = hsv[..., 1] ** power * factor + addition
    hsv[..., 2] = hsv[..., 2] ** power * factor + addition
    return authors_stretch(hsv2rgb(hsv))


def authors_hsv_color(im01, addition):
    """transformations.py, HSV_color.__call__: hue + addition, back to RGB, stretched."""
    hsv = rgb2hsv(im01)
    hsv[..., 0] = hsv[..., 0] + addition
    return authors_stretch(hsv2rgb(hsv))


def authors_draws(n, seed=0):
    """The parameter draws of create_surrogate_data_STL.py's transformations (numpy's global RNG
    there, a RandomState here), in their order: PCA_rand_always (3 x uniform(0.5, 2)),
    Rotate_and_flip (an unused uniform angle, the flip ``uniform(-1, 1) > 0``, the angle
    ``20 * uniform(-1, 1)``), HSV_contrast_2 (power uniform(0.25, 4), factor uniform(0.7, 1.4),
    addition uniform(-0.1, 0.1)), HSV_color (uniform(-0.1, 0.1))."""
    r = np.random.RandomState(seed)
    out = {k: [] for k in ("pca", "flip", "angle", "power", "factor", "addition", "hue")}
    for _ in range(n):
        out["pca"].append([r.uniform(0.5, 2), r.uniform(0.5, 2), r.uniform(0.5, 2)])
        r.uniform(-20, 20)
        out["flip"].append(r.uniform(-1, 1) > 0)
        r.uniform(-1, 1)  # `if np.random.uniform(-1, 1) < 2`: always
        out["angle"].append(20 * r.uniform(-1, 1))
        out["power"].append(r.uniform(0.25, 4))
        out["factor"].append(r.uniform(0.7, 1.4))
        out["addition"].append(r.uniform(-0.1, 0.1))
        out["hue"].append(r.uniform(-0.1, 0.1))
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- deterministic parts


def random_patches(n=6, size=32, seed=0):
    g = np.random.default_rng(seed)
    base = g.uniform(0.1, 0.9, (n, 1, 1, 3))
    return np.clip(base + g.normal(0, 0.15, (n, size, size, 3)), 0, 1)  # (n, H, W, 3) on [0, 1]


def test_pca_of_the_patch_own_pixels_equals_the_authors_pca_rand_always():
    ims = random_patches()
    ch = np.random.default_rng(1).uniform(0.5, 2, (len(ims), 3))
    x = torch.from_numpy(ims * 255.0).permute(0, 3, 1, 2).float()
    got = (patch_pca(x, torch.from_numpy(ch)) / 255.0).permute(0, 2, 3, 1).numpy()
    for i in range(len(ims)):
        want, want_stretched = authors_pca_rand_always(ims[i].astype(np.float32).astype(np.float64), ch[i])
        assert np.abs(got[i] - want).max() < 1e-5
        st = stretch_torch(torch.from_numpy(got[i : i + 1])).numpy()[0]
        assert np.abs(st - want_stretched).max() < 1e-5


def test_stretch_equals_the_authors_postprocessing():
    x = torch.from_numpy(np.random.default_rng(2).normal(0.4, 0.5, (5, 3, 8, 8))).float()
    got = stretch_torch(x).numpy()
    for i in range(5):
        assert np.abs(got[i] - authors_stretch(x[i].double().numpy())).max() < 1e-6
    assert stretch_torch(torch.full((1, 3, 4, 4), 7.0)).eq(0).all()  # a flat patch: 0, not 0/0


def test_shared_power_hsv_round_trip_equals_hsv_contrast_2_then_hsv_color():
    """One HSV round trip (fastssl, S and V unclipped, then stretched) = the authors' two
    (contrast, stretch; hue, stretch): a hue rotation commutes with the common affine stretch."""
    ims = random_patches(n=8, size=16, seed=3)
    d = authors_draws(8, seed=4)
    for i in range(8):
        p = [d["power"][i], d["factor"][i], d["addition"][i], d["power"][i], d["factor"][i], d["addition"][i]]
        p = torch.tensor(p + [d["hue"][i]], dtype=torch.float64)
        x = torch.from_numpy(ims[i]).permute(2, 0, 1)[None]
        out = hsv_adjust(x[:, 0], x[:, 1], x[:, 2], lambda k: p[k], _TORCH_OPS, clip=False)
        got = stretch_torch(torch.stack(out, -1)).numpy()[0]
        a = authors_hsv_contrast_2(ims[i], d["power"][i], d["factor"][i], d["addition"][i])
        # (the hue shift below 0 is taken mod 1 here: skimage's uint8 cast of the sector differs)
        want = authors_hsv_color(a, d["hue"][i])
        assert np.abs(got - want).max() < 1e-5, i


def test_shared_power_op_face_equals_the_transcription_to_one_grey_level():
    """HSVPower(stretch) on the torch face (0..255 in, uint8 out) against the transcription of
    the authors' chain, rounded the same way (floor(255 x + 0.5))."""
    ims = (random_patches(n=4, size=16, seed=5) * 255).round()
    d = authors_draws(4, seed=6)
    hsvp = np.stack(
        [d["power"], d["factor"], d["addition"], d["power"], d["factor"], d["addition"], d["hue"]], 1
    ).astype(np.float32)
    from fastssl.methods.exemplar.ops import HSVPower

    x = torch.from_numpy(ims).permute(0, 3, 1, 2).float()
    got = HSVPower(stretch=True).torch(x, {"hsvp": torch.from_numpy(hsvp)}, None).numpy().astype(int)
    for i in range(4):
        a = authors_hsv_contrast_2(authors_stretch(ims[i] / 255.0), *hsvp[i, :3].astype(np.float64))
        want = np.floor(authors_hsv_color(a, float(hsvp[i, 6])) * 255 + 0.5).astype(int)
        assert np.abs(got[i] - want).max() <= 1 and (got[i] != want).mean() < 0.01


def test_flip_mirrors_the_patch_as_the_authors_rotate_and_flip():
    """transformations.py, Rotate_and_flip: ``im_np[:, ::-1, :]``; fastssl folds the flip into the
    affine matrix: at identity geometry the patch is the exact mirror."""
    g = np.random.default_rng(7)
    img = g.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    args = (np.full((2, 2), 32.0), np.zeros((2, 2)), np.ones(2), np.zeros(2), np.ones((2, 3)))
    hsv = np.tile(ex.IDENTITY_HSV, (2, 1))
    plain = ex.generate_torch(to_chw(img), ex.make_params(*args, hsv, 32, 64, None), 32).numpy()
    flipped = ex.generate_torch(to_chw(img), ex.make_params(*args, hsv, 32, 64, None, [True, False]), 32).numpy()
    assert np.array_equal(plain, img[:, 16:48, 16:48])
    assert np.array_equal(flipped[0], plain[0][:, ::-1, :]) and np.array_equal(flipped[1], plain[1])


# --------------------------------------------------------------------------- distributions


def test_draws_follow_the_authors_distributions():
    n = 20000
    anchors = np.full((n, 2), 48.0)
    a = aug(flip=0.5, sv_shared=True, draw="uniform")
    p = ex.draw_params(np.random.default_rng(0), anchors, a, 32, 96, None)
    d = authors_draws(n)
    assert np.array_equal(p.hsv[:, 0], p.hsv[:, 3]) and np.array_equal(p.hsv[:, 1], p.hsv[:, 4])
    assert np.array_equal(p.hsv[:, 2], p.hsv[:, 5])  # one power, factor, offset for S and V
    # flip share: the authors' uniform(-1, 1) > 0 and fastssl's, both 0.5 (the affine's sign)
    flipped = np.linalg.det(p.affine[:, :, :2]) < 0
    assert abs(flipped.mean() - 0.5) < 0.02 and abs(d["flip"].mean() - 0.5) < 0.02
    for name, mine, lo, hi in (
        ("power", p.hsv[:, 0], 0.25, 4),
        ("factor", p.hsv[:, 1], 0.7, 1.4),
        ("addition", p.hsv[:, 2], -0.1, 0.1),
        ("hue", p.hsv[:, 6], -0.1, 0.1),
    ):
        assert lo <= mine.min() and mine.max() <= hi, name
        assert stats.ks_2samp(mine, d[name]).pvalue > 1e-3, name  # same law as the authors' draw
    # PCA factors: uniform on [0.5, 2] per component (draw=uniform), stored per patch for pca_basis=patch
    q = ex.draw_params(np.random.default_rng(1), anchors, aug(draw="uniform", pca_basis="patch"), 32, 96, None)
    assert q.pcaf.shape == (n, 3) and 0.5 <= q.pcaf.min() and q.pcaf.max() <= 2
    assert stats.ks_2samp(q.pcaf.reshape(-1), d["pca"].reshape(-1)).pvalue > 1e-3
    # the text's side, log-uniform and separate, is another law (KS rejects)
    r = ex.draw_params(np.random.default_rng(2), anchors, aug(**TEXT), 32, 96, None)
    assert not np.array_equal(r.hsv[:, 0], r.hsv[:, 3])
    assert stats.ks_2samp(r.hsv[:, 0], d["power"]).pvalue < 1e-6


def test_text_side_draws_are_the_old_draws_bit_for_bit():
    """With the switches on the text's side (the defaults before the authors' became the defaults
    where the text is silent), draw_params makes the same draws in the same order as before."""
    a, n = aug(**TEXT), 64
    anchors = np.random.default_rng(3).uniform(16, 80, (n, 2))
    rng = np.random.default_rng(9)
    shift = np.clip(rng.normal(0.0, a.translate * 16, (n, 2)), -a.translate * 32, a.translate * 32)
    scale, angle = rng.uniform(*a.scale, n), rng.uniform(-a.rotate, a.rotate, n)

    def lu(r, size):
        return np.exp(r.uniform(np.log(r_[0]), np.log(r_[1]), size))

    r_ = a.pca
    pcaf = lu(rng, (n, 3))
    cols = []
    for _ in range(2):
        r_ = a.sv_power
        cols += [lu(rng, n), rng.uniform(*a.sv_mul, n), rng.uniform(*a.sv_add, n)]
    hsv = np.stack(cols + [rng.uniform(-a.hue, a.hue, n)], 1)
    want = ex.make_params(anchors, shift, scale, angle, pcaf, hsv, 32, 96, None)
    got = ex.draw_params(np.random.default_rng(9), anchors, a, 32, 96, None)
    assert got.pcaf is None
    for k in ("affine", "cmat", "coff", "hsv"):
        assert np.array_equal(getattr(got, k), getattr(want, k)), k


# --------------------------------------------------------------------------- executors


def test_dali_and_torch_faces_agree_with_the_authors_switches():
    pytest.importorskip("nvidia.dali")
    g = np.random.default_rng(11)
    images = g.integers(0, 256, (16, 48, 48, 3), dtype=np.uint8)
    a = aug(flip=0.5, sv_shared=True, draw="uniform", stretch=True)
    basis = ex.pca_basis(to_chw(images))
    p = ex.draw_params(g, g.uniform(8, 40, (16, 2)), a, 32, 48, basis)
    recipe = ex.patch_recipe(32, a)
    d = dali_patches(images, recipe, [ex.param_fields(p)[name][:, 0] for name in recipe.reads])
    t = ex.generate_torch(to_chw(images), p, 32, a).numpy()
    diff = np.abs(d.astype(int) - t.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert t.reshape(16, -1).min(1).max() == 0 and t.reshape(16, -1).max(1).min() == 255  # stretched


def test_stretch_graph_builds_on_the_gpu_and_patch_pca_is_refused_on_dali():
    pytest.importorskip("nvidia.dali")
    from fastssl.data.dali_check import graph_ops
    from fastssl.data.executors.dali import build_dali_pipeline

    a = aug(stretch=True)
    pipe = build_dali_pipeline([], ex.patch_recipe(32, a), "gpu", 8, 1, 0, 64, False, (0.5,) * 3, (0.25,) * 3)
    ops = graph_ops(pipe)
    assert [d for n, d in ops if n == "fn.reductions.min"] == ["gpu"] * 2
    assert [d for n, d in ops if n == "fn.reductions.max"] == ["gpu"] * 2
    with pytest.raises(ConfigError, match=r"method\.aug\.pca_basis: .*dali-cpu"):
        build_dali_pipeline(
            [], ex.patch_recipe(32, aug(pca_basis="patch")), "cpu", 8, 1, None, 64, False, (0.5,) * 3, (0.25,) * 3
        )
    for pipeline in ("dali-cpu", "auto"):
        with pytest.raises(ConfigError, match=rf"method\.aug\.pca_basis: .*data\.pipeline={pipeline}"):
            load_config(os.path.join(ROOT, CFG), [*SMALL, "method.aug.pca_basis=patch", f"data.pipeline={pipeline}"])


# --------------------------------------------------------------------------- fixed set


def test_fixed_set_shows_the_same_patches_every_epoch():
    g = np.random.default_rng(12)
    sset = ex.SurrogateSet(np.arange(8), np.arange(8), g.uniform(16, 48, (8, 2)).astype(np.float32), 8)
    a = aug(flip=0.5, sv_shared=True)

    def epoch(recipe, e):
        plan = recipe.plan(5, e, 0, 1, 8)
        out = {}
        for k in range(plan.steps):
            s = plan.step(k)
            for j, pos in enumerate(plan.pos[k].reshape(-1)):
                out[int(pos)] = (int(s.index[j]), s.fields["affine"][j].copy(), s.fields["hsvp"][j].copy())
        return out, plan.pos.reshape(-1).tolist()

    fixed = ex.surrogate_recipe(sset, a, 32, 64, None, 4, surrogate="fixed")
    e0, o0 = epoch(fixed, 0)
    e1, o1 = epoch(fixed, 1)
    again, _ = epoch(ex.surrogate_recipe(sset, a, 32, 64, None, 4, surrogate="fixed"), 3)  # a new process: same set
    assert o0 != o1 and sorted(e0) == sorted(e1) == list(range(32))
    for pos in e0:
        for b in (e1, again):
            assert e0[pos][0] == b[pos][0] and np.array_equal(e0[pos][1], b[pos][1])
            assert np.array_equal(e0[pos][2], b[pos][2])
    per_epoch = ex.surrogate_recipe(sset, a, 32, 64, None, 4)
    p0, _ = epoch(per_epoch, 0)
    p1, _ = epoch(per_epoch, 1)
    assert not all(np.array_equal(p0[k][1], p1[k][1]) for k in p0)  # today's default: new patches


@pytest.mark.slow
def test_fixed_set_survives_a_kill_and_resume_bit_exactly(tmp_path):
    """Killed in stage 2 (the clustered set's fixed patches) and resumed: the resumed run
    regenerates the same fixed set and ends with the reference's weights.  (On dali-cpu;
    tests/test_exemplar.py has the data.pipeline=torch kill-and-resume.)"""
    common = [
        *SMALL,
        "method.cluster.enabled=true",
        "method.cluster.threshold=0.6",
        "method.surrogate=fixed",
        "train.epochs=1",
        "train.ckpt_every_steps=4",
        "data.pipeline=dali-cpu",
    ]
    # killed at step 25-27, between the checkpoints of steps 24 and 28 (a kill at a checkpoint
    # step leaves that step's checkpoint and redoes nothing: not the case under test)
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, CFG, (25, 28))
    assert ref["step"] == resumed["step"] == 32 and crashed["step"] == 24 < kill_at
    for k, v in ref["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed["model"][k]), k


# --------------------------------------------------------------------------- network, optimiser, features


def test_authors_dropout_l2_and_schedule():
    from fastssl.data.sources import build_source
    from fastssl.engine.optim import build_optimizer, lr_factor
    from fastssl.methods.exemplar import ExemplarCNN
    from fastssl.models import build_backbone

    over = ["data.source=builtin", "data.path=null", "method.num_classes=100", "model.width=8"]
    cfg = load_config(os.path.join(ROOT, "configs/exemplar/stl10-authors.yaml"), over + ["data.pipeline=torch"])
    paper = load_config(os.path.join(ROOT, "configs/exemplar/stl10.yaml"), over)
    src = build_source(cfg)
    nets = []
    for c in (cfg, paper):
        torch.manual_seed(0)
        nets.append(ExemplarCNN(c, build_backbone(c.model, src.image_size), src.image_size, len(src.pretrain)))
        nets[-1].rng_after = torch.random.get_rng_state()
    m, m0 = nets
    assert torch.equal(m.rng_after, m0.rng_after)  # same parameter creation and RNG use
    sd, sd0 = m.state_dict(), m0.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd if isinstance(sd[k], torch.Tensor))
    drop = {n: [type(x).__name__ for x in s if isinstance(x, torch.nn.Dropout)] for n, s in m.backbone.stages.items()}
    assert drop == {"conv1": [], "conv2": [], "conv3": [], "fc1": ["Dropout"]}  # networks.py, `largest`
    assert all(any(isinstance(x, torch.nn.Dropout) for x in s) for s in m0.backbone.stages.values())
    opt, _ = build_optimizer(cfg, m, 128, torch.device("cpu"))
    g = {x["name"]: x for x in opt.param_groups}
    # training_scripts/exp083.py: lr .01, biases x2, fc2 weight x.25; WD .004 x (0, 0, .25, 1, 4)
    want = {"weights": (0.01, 0), "biases": (0.02, 0), "fc1": (0.01, 0.004), "fc2": (0.0025, 0.016)}
    want["conv3"] = (0.01, 0.001)
    assert g.keys() == want.keys()
    for k, (lr, wd) in want.items():
        assert (g[k]["lr"], g[k]["weight_decay"]) == pytest.approx((lr, wd)), k
    assert g["conv3"]["params"] == [m.backbone.stages["conv3"][0].weight]
    assert len(build_optimizer(paper, m0, 128, torch.device("cpu"))[0].param_groups) == 4  # default: 4 groups
    # exp083.py: after epoch index 75 or 92, lr x .4; after 85 or 100, x .25 (at the epoch's end)
    factor, want = 1.0, []
    for epoch in range(110):
        want.append(factor)
        factor *= 0.4 if epoch in (75, 92) else 0.25 if epoch in (85, 100) else 1.0
    got = [lr_factor(cfg, e * 10 + 5, 10) for e in range(110)]  # mid-epoch of each epoch
    assert got == pytest.approx(want)


def test_clustering_and_svm_features_equal_the_authors_extraction():
    """clustering/.../extracting_features_005.ipynb (net.forward_all_conv_feat, AdaptiveMaxPool2d(2))
    and evaluation/extract_32x32_largeNet.py (forward_all_conv_feat_after_relu, the fc layers as
    convolutions, process_layers_fc_l2), on training/networks.py's `largest` layout."""
    from fastssl.features.maps import authors_features, prerelu_conv_features
    from fastssl.models import exemplar_cnn

    torch.manual_seed(0)
    net = exemplar_cnn(8).eval()
    head = torch.nn.Linear(net.dim("fc1"), 20)
    x = torch.rand(3, 3, 64, 64)
    s = net.stages
    pool, fix = torch.nn.MaxPool2d(3, stride=2), torch.nn.AdaptiveMaxPool2d(2)
    with torch.no_grad():
        h = net.stem(x)
        c1 = s["conv1"][0](h)
        c2 = s["conv2"][0](pool(F.relu(c1)))
        c3 = s["conv3"][0](pool(F.relu(c2)))
        want = torch.cat([fix(c).view(3, -1) for c in (c1, c2, c3)], 1)
        assert (prerelu_conv_features(net, x) - want).abs().max() < 1e-5
        lin = s["fc1"][0].linear  # (their conversion uses stride 7: a gap, docs/fidelity.md)
        fc1 = F.relu(F.conv2d(F.relu(c3), lin.weight.view(lin.out_features, -1, 7, 7), lin.bias))
        fc2 = F.relu(F.conv2d(fc1, head.weight.view(20, -1, 1, 1), head.bias))
        blocks = [fix(F.relu(c)).view(3, -1) for c in (c1, c2, c3)] + [fix(fc1).view(3, -1), fix(fc2).view(3, -1)]
        want = torch.cat([b / b.norm(dim=1, keepdim=True) for b in blocks], 1)  # per image (theirs: per batch)
        assert (authors_features(net, x, head) - want).abs().max() < 1e-5


def test_svm_c_grid_by_cross_validation_and_by_test_accuracy():
    from fastssl.config import EvalConfig
    from fastssl.eval.svm import svm_folds

    g = np.random.default_rng(0)
    centres = g.normal(0, 1, (3, 16))
    y = np.repeat(np.arange(3), 60)
    x = (centres[y] + g.normal(0, 0.7, (180, 16))).astype(np.float32)
    folds = [np.arange(0, 180, 3), np.arange(1, 180, 3)]
    lines = []
    base = svm_folds(x, y, x, y, folds, EvalConfig(svm_c=1.0), log=lines.append)
    for sel in ("cv", "test"):
        grid = EvalConfig(svm_c_grid=[0.01, 1.0, 100.0], svm_c_select=sel, svm_scale=False)
        r = svm_folds(x, y, x, y, folds, grid, log=lines.append)
        assert r["accuracy"] > 80 and any(", C " in line for line in lines), (r, lines)
    assert base["accuracy"] > 80
    with pytest.raises(ValueError, match="c_select"):
        svm_folds(x, y, x, y, folds, EvalConfig(svm_c_grid=[1.0], svm_c_select="best"))


# --------------------------------------------------------------------------- refusals, a short run


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.surrogate=weekly", "method.surrogate"),
        ("method.dropout=none", "method.dropout"),
        ("method.l2_conv3=-0.1", "method.l2_conv3"),
        ("method.cluster.features=fc", "method.cluster.features"),
        ("method.aug.flip=1.5", "method.aug.flip"),
        ("method.aug.pca_basis=image", "method.aug.pca_basis"),
        ("method.aug.draw=normal", "method.aug.draw"),
        ("method.aug.sv_shared=maybe", "method.aug.sv_shared"),
        ("method.aug.stretch=maybe", "method.aug.stretch"),
    ],
)
def test_bad_authors_switches_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(os.path.join(ROOT, CFG), [override, "method.cluster.enabled=false", "data.pipeline=torch"])


@pytest.mark.slow
def test_short_run_with_every_authors_switch(tmp_path):
    """Stage 1 on the fixed set with the authors' transformations, their clustering features,
    stage 2 on the merged classes: finite losses, validation accuracy logged, the clustering ran."""
    out = tmp_path / "authors"
    proc = run(
        train_cmd(
            out,
            *SMALL,
            *AUTHORS,
            "method.cluster.enabled=true",
            "method.cluster.threshold=0.6",
            "method.cluster.features=authors",
            "train.epochs=1",
            config=CFG,
        )
    )
    log = read_metrics(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(np.isfinite(losses)) and any("val_acc" in r for r in log)
    assert "fastssl: exemplar clustering:" in proc.stderr
