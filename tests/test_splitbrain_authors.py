"""Split-Brain ``method.ab_bins=grid313`` against the colourisation code it takes its ab targets
from: the soft encoding, the class-rebalancing weights and the loss equal transcriptions of the
authors' layers on identical inputs; the reach of both class sets over the sRGB gamut; the
executors agree; the DALI graph builds for device='gpu'; the setting trains and is refused when
wrong.

The transcriptions (``NNEncode``, ``PriorFactor``, the NonGrayMask/PriorBoost/ClassRebalanceMult
wiring) follow github.com/richzhang/colorization, ``resources/caffe_traininglayers.py`` (classes
``NNEncode``, ``PriorFactor``, ``NonGrayMaskLayer``, ``PriorBoostLayer``,
``ClassRebalanceMultLayer``) and ``models/colorization_train_val_v2.prototxt`` (the layer wiring),
ported from Python 2 to NumPy 2 with their algorithm (sklearn's ball-tree nearest neighbours)
and constants (NN = 10, sigma = 5, alpha = 1, gamma = 0.5, thresh = 5).  Split-Brain's own
training code is not public.
"""

import numpy as np
import pytest
import sklearn.neighbors as nn
import torch

from conftest import ROOT, read_metrics, run, run_dali_graph, train_cmd
from fastssl.config import ConfigError
from fastssl.data.lab import GRID313, ColorSplit, rgb_to_lab
from fastssl.methods.splitbrain.encoding import nongray_mask, prior_factor, soft_encode

CFG = "configs/splitbrain/builtin.yaml"
GRID = ["method.ab_bins=grid313"]


# ---------------------------------------------------------------------------- the transcriptions
# richzhang/colorization, resources/caffe_traininglayers.py (Richard Zhang, 2016)


def flatten_nd_array(pts_nd, axis=1):
    """caffe_traininglayers.flatten_nd_array: N0 x ... x Nd -> prod(N \\ N_axis) x N_axis."""
    nax = np.setdiff1d(np.arange(pts_nd.ndim), np.array(axis))
    axorder = np.concatenate((nax, np.array(axis).flatten()), axis=0)
    return pts_nd.transpose(axorder).reshape(int(np.prod(np.array(pts_nd.shape)[nax])), pts_nd.shape[axis])


def unflatten_2d_array(pts_flt, pts_nd, axis=1):
    """caffe_traininglayers.unflatten_2d_array (squeeze=False)."""
    shp = np.array(pts_nd.shape)
    nax = np.setdiff1d(np.arange(pts_nd.ndim), np.array(axis))
    axorder = np.concatenate((nax, np.array(axis).flatten()), axis=0)
    return pts_flt.reshape(shp[nax].tolist() + [pts_flt.shape[1]]).transpose(np.argsort(axorder))


class NNEncode:
    """caffe_traininglayers.NNEncode: encode points using NN search and a Gaussian kernel."""

    def __init__(self, NN, sigma, cc):
        self.cc = cc
        self.K = self.cc.shape[0]
        self.NN = int(NN)
        self.sigma = sigma
        self.nbrs = nn.NearestNeighbors(n_neighbors=self.NN, algorithm="ball_tree").fit(self.cc)

    def encode_points_mtx_nd(self, pts_nd, axis=1):
        pts_flt = flatten_nd_array(pts_nd, axis=axis)
        P = pts_flt.shape[0]
        (dists, inds) = self.nbrs.kneighbors(pts_flt)
        pts_enc_flt = np.zeros((P, self.K))
        wts = np.exp(-(dists**2) / (2 * self.sigma**2))
        wts = wts / np.sum(wts, axis=1)[:, None]
        pts_enc_flt[np.arange(0, P, dtype="int")[:, None], inds] = wts
        return unflatten_2d_array(pts_enc_flt, pts_nd, axis=axis)


class PriorFactor:
    """caffe_traininglayers.PriorFactor (the prior given as an array instead of a file)."""

    def __init__(self, alpha, gamma, prior_probs):
        self.alpha, self.gamma = alpha, gamma
        self.prior_probs = prior_probs
        self.uni_probs = np.zeros_like(self.prior_probs)
        self.uni_probs[self.prior_probs != 0] = 1.0
        self.uni_probs = self.uni_probs / np.sum(self.uni_probs)
        self.prior_mix = (1 - self.gamma) * self.prior_probs + self.gamma * self.uni_probs
        self.prior_factor = self.prior_mix**-self.alpha
        self.prior_factor = self.prior_factor / np.sum(self.prior_probs * self.prior_factor)  # re-normalize

    def forward(self, data_ab_quant, axis=1):
        data_ab_maxind = np.argmax(data_ab_quant, axis=axis)
        return self.prior_factor[data_ab_maxind][:, None]  # (axis 1)


def nongray_mask_authors(data_ab_ss, thresh=5):
    """NonGrayMaskLayer.forward: 1 for an image with some |a| or |b| above thresh."""
    return (np.sum(np.sum(np.sum(np.abs(data_ab_ss) > thresh, axis=1), axis=1), axis=1) > 0)[:, None, None, None]


def loss_authors(logits, data_ab_ss, prior):
    """models/colorization_train_val_v2.prototxt: gt_ab_313 = NNEnc(data_ab_ss); prior_boost_nongray
    = PriorBoost(gt_ab_313) * NonGrayMask(data_ab_ss); SoftmaxCrossEntropyLoss of conv8_313 against
    gt_ab_313 whose gradient ClassRebalanceMult scales by prior_boost_nongray.  As a loss whose
    gradient is that one: the weighted cross-entropy per cell, here averaged over cells."""
    gt = NNEncode(10, 5.0, GRID313).encode_points_mtx_nd(data_ab_ss, axis=1)
    boost = PriorFactor(1.0, 0.5, prior).forward(gt, axis=1) * nongray_mask_authors(data_ab_ss)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(boost[:, 0] * -(gt * logp).sum(1)))


def random_ab(n, seed=0):
    """Random ab points over and beyond the 313 centres' range (-110..100)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-120, 120, (n, 2))


def random_prior(seed=1):
    p = np.random.default_rng(seed).gamma(0.5, 1.0, len(GRID313)) + 1e-6
    return p / p.sum()


# ---------------------------------------------------------------------------- maths vs theirs


def test_grid313_is_their_pts_in_hull():
    assert GRID313.shape == (313, 2) and np.all(GRID313 % 10 == 0)
    assert GRID313[:, 0].min() == -90 and GRID313[:, 0].max() == 100
    assert GRID313[:, 1].min() == -110 and GRID313[:, 1].max() == 100
    assert np.all(np.lexsort((GRID313[:, 1], GRID313[:, 0])) == np.arange(313))  # their order: a, then b
    assert len(np.unique(GRID313, axis=0)) == 313
    # a few rows of their file, in their order
    assert GRID313[:3].tolist() == [[-90, 50], [-90, 60], [-90, 70]] and GRID313[-1].tolist() == [100, 0]


def test_soft_encoding_equals_nnencode():
    ab = random_ab(4 * 6 * 6).reshape(4, 6, 6, 2).transpose(0, 3, 1, 2)  # (N, 2, h, w) as their layer sees it
    want = NNEncode(10, 5.0, GRID313).encode_points_mtx_nd(ab, axis=1)  # (N, 313, h, w), float64
    pts = torch.from_numpy(ab).float().permute(0, 2, 3, 1).reshape(-1, 2)
    w, idx = soft_encode(pts, torch.from_numpy(GRID313).float())
    got = torch.zeros(len(pts), 313).scatter_(1, idx, w).reshape(4, 6, 6, 313).permute(0, 3, 1, 2).numpy()
    assert np.abs(got - want).max() < 1e-5
    assert (np.count_nonzero(want, axis=1) == 10).all()
    np.testing.assert_array_equal(idx[:, 0].numpy(), np.argmax(flatten_nd_array(want), 1))  # nearest = argmax


def test_rebalancing_weights_equal_priorfactor():
    p = random_prior()
    theirs = PriorFactor(1.0, 0.5, p)
    ours = prior_factor(torch.from_numpy(p).float()).numpy()
    np.testing.assert_allclose(ours, theirs.prior_factor, rtol=1e-5, atol=0)
    assert abs(float((p * ours).sum()) - 1) < 1e-6  # expected weight 1
    # the weight of a cell: their PriorBoost (argmax of the soft target) = ours (the nearest bin)
    ab = random_ab(300, seed=2).reshape(3, 10, 10, 2).transpose(0, 3, 1, 2)
    gt = NNEncode(10, 5.0, GRID313).encode_points_mtx_nd(ab, axis=1)
    _, idx = soft_encode(torch.from_numpy(ab).float().permute(0, 2, 3, 1).reshape(-1, 2), torch.from_numpy(GRID313))
    np.testing.assert_allclose(ours[idx[:, 0].numpy()], theirs.forward(gt)[:, 0].reshape(-1), rtol=1e-5, atol=0)


def test_a_prior_with_unseen_bins_gives_finite_weights():
    p = random_prior()
    p[:40] = 0
    p /= p.sum()
    w = prior_factor(torch.from_numpy(p)).numpy()
    assert np.isfinite(w).all() and abs((p * w).sum() - 1) < 1e-9
    assert np.allclose(w[:40], w[:40][0]) and w[:40][0] >= w[40:].max()  # unseen: the limit p -> 0
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(PriorFactor(1.0, 0.5, p).prior_factor).all()  # (theirs: 0 ** -1 -> NaN)


def test_nongray_mask_equals_theirs():
    ab = np.random.default_rng(3).uniform(-4, 4, (4, 2, 5, 5))
    ab[1, 0, 2, 3] = 5.5
    ab[2, 1, 0, 0] = -30
    ab[3, 0, 4, 4] = 5.0  # not above the threshold
    np.testing.assert_array_equal(nongray_mask(torch.from_numpy(ab)).numpy(), nongray_mask_authors(ab)[:, 0, 0, 0])
    assert nongray_mask(torch.from_numpy(ab)).tolist() == [0, 1, 1, 0]


@pytest.fixture
def grid_method(tiny_cfg):
    from fastssl.data.sources import build_source
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    def make(*overrides):
        cfg = tiny_cfg(*GRID, *overrides, config=f"{ROOT}/{CFG}")
        src = build_source(cfg)
        m = get_method("splitbrain")(cfg, build_backbone(cfg.model, src.image_size), src.image_size, len(src.pretrain))
        return cfg, src, m

    return make


def test_loss_equals_the_authors_weighted_soft_cross_entropy(grid_method):
    _, src, m = grid_method()
    p = random_prior(seed=4)
    m.ab_prior.copy_(torch.from_numpy(p))
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (4, 313, 4, 4))
    ab = rng.uniform(-60, 60, (4, 2, 4, 4))
    ab[3] = rng.uniform(-3, 3, (2, 4, 4))  # a grey image: weight 0
    got = m.soft_ab_loss(torch.from_numpy(logits).float(), torch.from_numpy(ab).float())
    want = loss_authors(logits, ab, p)
    assert abs(float(got) - want) < 1e-5  # (a loss of about 10)
    # the ab head has 313 outputs; the ab -> L head is unchanged
    assert m.heads[0].out_channels == 313 and m.heads[1].out_channels == 100


def test_prior_is_the_mean_soft_encoding_of_the_images(grid_method):
    _, src, m = grid_method()
    m.begin_stage(0, src)
    x = torch.from_numpy(src.pretrain.images).permute(0, 3, 1, 2).float() / 255
    ab = torch.nn.functional.avg_pool2d(rgb_to_lab(x)[:, 1:3], m.split.factor).numpy()  # the targets' block means
    want = NNEncode(10, 5.0, GRID313).encode_points_mtx_nd(ab, axis=1).mean((0, 2, 3))
    got = m.ab_prior.numpy()
    assert abs(got.sum() - 1) < 1e-9 and np.abs(got - want).max() < 1e-5
    assert "ab_prior" in m.state_dict() and "ab_centres" not in m.state_dict()  # checkpointed (resume reuses it)


def test_default_has_no_grid313_state(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(config=f"{ROOT}/{CFG}")
    m = get_method("splitbrain")(cfg, build_backbone(cfg.model, 32), 32)
    assert cfg.method.ab_bins == "seed100" and m.heads[0].out_channels == 100
    assert not any(k.startswith("ab_") for k in m.state_dict())


# ---------------------------------------------------------------------------- reach over sRGB


def srgb_ab(step=3):
    """The ab of a dense sRGB grid: every ``step``-th byte value per channel, and 255."""
    v = np.unique(np.r_[np.arange(0, 256, step), 255])
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    x = torch.from_numpy(rgb.T.astype(np.float32) / 255).reshape(1, 3, -1, 1)
    return rgb_to_lab(x)[0, 1:, :, 0].T.double().numpy()


def test_classes_reached_by_srgb_colours():
    """seed100: 63 of 100 joint bins; grid313: 261 of 313 nearest centres (over all 256^3 colours
    the counts are the same: 63 and 261, measured once with step 1)."""
    ab = srgb_ab(3)
    split = ColorSplit(space="lab")
    q = np.clip(np.floor((ab + 110) / 220 * 10), 0, 9).astype(int)
    seed = np.unique(q[:, 0] * 10 + q[:, 1]).size
    # the nearest of the 313 centres: rounding to the 10-unit lattice (exact when that lattice point is one of them)
    at = {tuple(c): i for i, c in enumerate(GRID313.astype(int).tolist())}
    near = np.array([at.get(k, -1) for k in map(tuple, (np.round(ab / 10) * 10).astype(int).tolist())])
    off = near < 0
    if off.any():
        near[off] = ((ab[off, None] - GRID313[None]) ** 2).sum(-1).argmin(1)
    assert split.classes == (100, 100) and ColorSplit(space="lab", ab_bins="grid313").classes == (100, 313)
    assert seed == 63
    assert np.unique(near).size == 261


# ---------------------------------------------------------------------------- config, pipeline, runs


@pytest.mark.parametrize(
    "override",
    [
        ["method.ab_bins=grid100"],
        ["method.ab_bins=grid313", "method.space=rgb"],
        ["method.ab_bins=grid313", "method.rescale=true"],
    ],
)
def test_bad_ab_bins_are_refused(tiny_cfg, override):
    with pytest.raises(ConfigError, match="method.ab_bins"):
        tiny_cfg(*override, config=f"{ROOT}/{CFG}")


def test_dali_and_torch_faces_agree_in_grid313():
    pytest.importorskip("nvidia.dali")
    from skimage import data as skdata

    split = ColorSplit(space="lab", factor=8, ab_bins="grid313")
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    ims += [np.ascontiguousarray(getattr(skdata, n)()[100:132, 150:182]) for n in ("astronaut", "coffee")]
    dali = run_dali_graph(ims, lambda x: split.dali(x, 32))
    ref = split.torch(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2))
    assert dali[2].shape == (4, 2, 4, 4) and dali[2].dtype == np.float32 and ref[2].dtype == torch.float32
    np.testing.assert_allclose(dali[0], ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(dali[2], ref[2].numpy(), atol=1e-3)  # ab units (-110..110)
    assert (dali[1] == ref[1].numpy()).mean() > 0.99
    # the block-mean ab is what seed100 quantises: the same cells
    q = ColorSplit(space="lab", factor=8).torch(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2))[2].numpy()
    a, b = (np.clip(np.floor((ref[2][:, i].numpy() + 110) / 22), 0, 9) for i in (0, 1))
    assert ((a * 10 + b) == q).mean() > 0.99


@pytest.mark.parametrize("kind", ["dali-cpu", "torch", "tensor"])
def test_executors_deliver_the_same_grid313_batches(grid_method, tiny_cfg, kind):
    pytest.importorskip("nvidia.dali")
    cfg, src, m = grid_method()
    m.begin_stage(0, src)
    batches = []
    for k in ("torch", kind):
        c = tiny_cfg(*GRID, f"data.pipeline={k}", config=f"{ROOT}/{CFG}")
        loader = m.loader(c, src)
        loader.set_epoch(0)
        batches.append(next(iter(loader)))
    (tx, t1, t2), (dx, d1, d2) = batches[0]["views"], batches[1]["views"]
    assert torch.equal(batches[0]["index"], batches[1]["index"])
    assert d2.shape == (32, 2, 4, 4) and d2.dtype == torch.float32 and d1.dtype == torch.int32
    torch.testing.assert_close(dx, tx, atol=1e-4, rtol=0)
    torch.testing.assert_close(d2, t2, atol=1e-3, rtol=0)
    assert (d1 == t1).float().mean() > 0.99
    out = m(batches[1]["views"], batches[1]["index"])
    assert torch.isfinite(out["loss"]) and out["loss_to_ab"] > 0
    out["loss"].backward()
    assert m.heads[0].weight.grad.abs().sum() > 0


def test_grid313_crop_graph_builds_on_the_gpu(grid_method, monkeypatch):
    """As tests/test_gpu_graphs.py does for the other recipes: build_loader with
    data.pipeline=dali-gpu checks the graph (check_gpu_graph) and builds it; the Lab maths and
    the ab block means run on the GPU, nothing but inputs and argument bookkeeping on the CPU."""
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.plugin.pytorch as dali_torch
    from omegaconf import OmegaConf

    from fastssl.data.dali_check import crop_pipeline, graph_ops
    from fastssl.data.executors.dali import DaliExecutor

    graphs = []

    class GraphOnly:
        def __init__(self, pipes, names, **kw):
            graphs.append(graph_ops(pipes[0]))

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(dali_torch, "DALIGenericIterator", GraphOnly)
    cfg, src, m = grid_method()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.data.pipeline = "dali-gpu"  # (config validation refuses it without CUDA: set after)
    m.begin_stage(0, src)
    loader = m.loader(cfg, src, device_id=0)  # runs check_gpu_graph
    assert isinstance(loader, DaliExecutor)
    loader.set_epoch(0)
    assert list(loader) == []
    ops = graphs[-1]
    heavy = {
        "fn.slice": 1,
        "fn.flip": 1,
        "fn.lookup_table": 1,
        "fn.coord_transform": 2,
        "fn.transpose": 2,
        "fn.reshape": 1,
        "fn.reductions.mean": 1,
        "fn.cast": 1,
        "math.cbrt": 1,
    }
    for name, count in heavy.items():
        assert [d for n, d in ops if n == name] == ["gpu"] * count, (name, ops)
    assert {n for n, d in ops if d == "cpu"} <= {"fn.external_source", "fn.constant", "fn._tensor_subscript"}, ops
    assert all(d == "gpu" for n, d in ops if n.startswith("math.")), ops
    assert ops == graph_ops(crop_pipeline(m.recipe(), src, src.pretrain, cfg.data.batch_size))


def test_short_grid313_run(tmp_path):
    out = tmp_path / "sb313"
    run(train_cmd(str(out), *GRID, "train.max_steps=3", "data.pipeline=dali-cpu", config=CFG), timeout=600)
    rows = read_metrics(out)
    losses = [r["loss_to_ab"] for r in rows if "loss_to_ab" in r]
    assert losses and all(np.isfinite(v) and v > 0 for v in losses)
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    prior = ck["model"]["ab_prior"]
    assert prior.shape == (313,) and abs(float(prior.sum()) - 1) < 1e-9
    assert ck["model"]["heads.0.weight"].shape[0] == 313
