"""Layer-wise contrastive: the authors' settings (issue 23), against a transcription of their code.

The transcription below is of github.com/Silent-Zebra/shallow-conv (itself adapted from
github.com/adambielski/siamese-triplet):
  * utils.py: ``pdist``, ``semihard_negative`` and ``FunctionNegativeTripletSelector.get_triplets``
    (as ``SemihardNegativeTripletSelector(margin)`` builds it);
  * losses.py: ``OnlineTripletLoss.forward``;
  * networks.py: ``generate_patches`` / ``ConvEmbeddingNet.forward`` with ``EmbeddingNet``
    (conv + ReLU, use_pooling=False); trainer.py: ``reshape_outputs_and_create_labels_conv``
    (labels = patch index // 4: integer division, as in the PyTorch of their time).
The one change: ``np.random.choice(semihard_negatives)`` becomes ``semihard_negatives[int(u * len)]``
with the same uniform ``u`` fastssl draws for that pair, so that both pick the same negative.
"""

from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_metrics, run, train_cmd
from fastssl.config import ConfigError
from fastssl.kernels import triplet as TK
from fastssl.losses import triplet as T

CFG = "configs/layerwise/builtin.yaml"
AUTHORS = [
    "method.distance=sqeuclidean",
    "method.margin=2.0",
    "method.mining=semihard",
    "method.pairs=subpatches",
    "method.embedding=flatten",
    "method.input=raw",
    "model.width=32",
]


# ---- the authors' computation, transcribed


def authors_pdist(vectors):  # utils.pdist
    return (
        -2 * vectors.mm(torch.t(vectors))
        + vectors.pow(2).sum(dim=1).view(1, -1)
        + vectors.pow(2).sum(dim=1).view(-1, 1)
    )


def authors_online_semihard_loss(embeddings, target, margin, u_of_pair):
    """utils.FunctionNegativeTripletSelector.get_triplets (semihard_negative) + losses.OnlineTripletLoss.forward;
    ``u_of_pair[(anchor, positive)]`` replaces np.random.choice's draw."""
    distance_matrix = authors_pdist(embeddings).cpu()
    labels = target.cpu().data.numpy()
    triplets = []
    for label in set(list(labels.flatten())):
        label_mask = labels == label
        label_indices = np.where(label_mask)[0]
        if len(label_indices) < 2:
            continue
        negative_indices = np.where(np.logical_not(label_mask))[0]
        anchor_positives = np.array(list(combinations(label_indices, 2)))
        ap_distances = distance_matrix[anchor_positives[:, 0], anchor_positives[:, 1]]
        for anchor_positive, ap_distance in zip(anchor_positives, ap_distances):
            loss_values = (
                ap_distance
                - distance_matrix[torch.LongTensor(np.array([anchor_positive[0]])), torch.LongTensor(negative_indices)]
                + margin
            )
            loss_values = loss_values.data.cpu().numpy()
            semihard_negatives = np.where(np.logical_and(loss_values < margin, loss_values > 0))[0]  # semihard_negative
            u = u_of_pair[(int(anchor_positive[0]), int(anchor_positive[1]))]
            hard_negative = (
                semihard_negatives[int(u * len(semihard_negatives))] if len(semihard_negatives) > 0 else None
            )
            if hard_negative is not None:
                triplets.append([anchor_positive[0], anchor_positive[1], negative_indices[hard_negative]])
    if len(triplets) == 0:
        triplets.append([anchor_positive[0], anchor_positive[1], negative_indices[0]])
    triplets = torch.LongTensor(np.array(triplets))
    ap_distances = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 1]]).pow(2).sum(1)
    an_distances = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 2]]).pow(2).sum(1)
    return F.relu(ap_distances - an_distances + margin).mean(), len(triplets)


def authors_embeddings(conv, crops, patch_size=7):
    """networks.generate_patches + EmbeddingNet (conv + ReLU) + trainer.reshape_outputs_and_create_labels_conv."""
    patches = crops.unfold(2, patch_size, 1).unfold(3, patch_size, 1).permute(0, 2, 3, 1, 4, 5).contiguous()
    patches = patches.view(
        patches.shape[0] * patches.shape[1] * patches.shape[2], patches.shape[3], patches.shape[4], patches.shape[5]
    )
    out = F.relu(conv(patches)).squeeze()
    out = out.view(out.shape[0], out.shape[1] * out.shape[2] * out.shape[3])
    patch_num_dim = (crops.shape[2] - patch_size) // 1 + 1
    return out, torch.arange(0, end=out.shape[0]) // (patch_num_dim**2)


def crop_pairs(b):
    """fastssl's pair order for b crops of 4 sub-patches (label, then combinations order)."""
    return torch.tensor([(4 * c + i, 4 * c + j) for c in range(b) for i, j in combinations(range(4), 2)])


# ---- the loss alone


@pytest.mark.parametrize("scale, b", [(0.15, 24), (0.3, 16), (0.05, 8)])
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_semihard_loss_matches_the_authors(scale, b, impl):
    g = torch.Generator().manual_seed(int(scale * 100) + b)
    e = torch.randn(4 * b, 64, generator=g) * scale
    labels = torch.arange(4 * b) // 4
    pairs = crop_pairs(b)
    u = torch.rand(len(pairs), generator=g, dtype=torch.float64)
    fn = TK.semihard_triplet_loss_fused if impl == "fused" else T.semihard_triplet_loss_eager
    loss, kept = fn(e, labels, pairs, margin=2.0, distance="sqeuclidean", u=u)
    ref, ref_kept = authors_online_semihard_loss(
        e, labels, 2.0, {tuple(p.tolist()): float(x) for p, x in zip(pairs, u)}
    )
    assert kept == ref_kept and 0 < kept
    assert abs(loss.item() - ref.item()) <= 1e-5, (loss.item(), ref.item())


def test_without_any_semihard_negative_the_authors_fallback_triplet():
    e = torch.zeros(4 * 5, 8)
    e[:, 0] = torch.arange(20) // 4 * 100.0  # other crops far away: every d_an > d_ap + margin
    e[:, 1] = torch.arange(20) % 4 * 0.1
    labels, pairs = torch.arange(20) // 4, crop_pairs(5)
    u = torch.rand(len(pairs), dtype=torch.float64)
    loss, kept = T.semihard_triplet_loss_eager(e, labels, pairs, 2.0, "sqeuclidean", u)
    ref, ref_kept = authors_online_semihard_loss(e, labels, 2.0, {tuple(p.tolist()): 0.5 for p in pairs})
    assert kept == ref_kept == 1 and loss.item() == ref.item()


def test_semihard_fused_is_the_eager_twin(monkeypatch):
    """No fused semi-hard kernel: loss.impl=fused runs the eager selection (reason in fastssl/kernels/triplet.py)."""
    calls = []
    eager = T.semihard_triplet_loss_eager
    monkeypatch.setattr(TK, "semihard_triplet_loss_eager", lambda *a, **k: calls.append(1) or eager(*a, **k))
    e, labels, pairs = torch.randn(32, 16) * 0.2, torch.arange(32) // 4, crop_pairs(8)
    u = torch.rand(len(pairs), dtype=torch.float64)
    fused = TK.semihard_triplet_loss_fused(e, labels, pairs, 2.0, "sqeuclidean", u)
    assert calls == [1] and torch.equal(fused[0], eager(e, labels, pairs, 2.0, "sqeuclidean", u)[0])


@pytest.mark.parametrize("hardest", [False, True])
def test_sqeuclidean_eager_and_fused_agree(hardest):
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(70, 40, generator=g) for _ in range(3))
    eager = T.triplet_loss_eager(a, p, n, margin=2.0, distance="sqeuclidean", hardest=hardest)
    fused = TK.triplet_loss_fused(a, p, n, margin=2.0, distance="sqeuclidean", hardest=hardest)
    want = F.relu((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + 2.0).mean()
    assert abs(eager.item() - fused.item()) <= 1e-5 * max(1.0, abs(eager.item()))
    if not hardest:
        assert abs(eager.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    else:  # the square is monotone: the Euclidean hardest negatives
        d, i = T.hardest_negatives_eager(a, p, n, "sqeuclidean")
        d1, i1 = T.hardest_negatives_eager(a, p, n, "euclidean")
        df, ifu = TK.hardest_negatives_fused(a, p, n, "sqeuclidean")
        assert (
            torch.equal(i, i1) and torch.equal(i, ifu) and torch.allclose(d, d1**2) and torch.allclose(d, df, rtol=1e-4)
        )


def test_existing_distances_unchanged():
    g = torch.Generator().manual_seed(4)
    a, p, n = (torch.randn(20, 8, generator=g) for _ in range(3))
    assert torch.equal(T.pair_distance(a, p, "euclidean"), (a - p).norm(dim=1))
    assert torch.equal(T.pair_distance(a, p, "sqeuclidean"), (a - p).pow(2).sum(1))


# ---- the method in the authors' mode


def make(tiny_cfg, *overrides):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(*overrides, config=f"{ROOT}/{CFG}")
    return get_method("layerwise")(cfg, build_backbone(cfg.model, 32), 32)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_authors_mode_matches_the_authors_pipeline(tiny_cfg, impl):
    m = make(tiny_cfg, *AUTHORS, f"loss.impl={impl}")
    crops = torch.rand(20, 3, 8, 8)  # raw [0, 1] crops
    torch.manual_seed(11)
    out = m([crops], torch.arange(20))
    torch.manual_seed(11)
    u = torch.rand(20 * 6, dtype=torch.float64)  # the method's first draw of the step
    e, target = authors_embeddings(m.backbone.stages["layer1"][0], crops)
    pairs = crop_pairs(20)
    ref, kept = authors_online_semihard_loss(e, target, 2.0, {tuple(p.tolist()): float(x) for p, x in zip(pairs, u)})
    assert abs(out["loss"].item() - ref.item()) <= 1e-5, (out["loss"].item(), ref.item())
    assert abs(out["triplets"].item() - kept / len(pairs)) < 1e-6
    out["loss"].backward()
    assert m.backbone.stages["layer1"][0].weight.grad.abs().sum() > 0


def test_subpatches_are_cut_from_the_planned_crop(tiny_cfg):
    m = make(tiny_cfg, "method.pairs=subpatches")
    r = m.recipe()
    assert r.views == 1 and r.size == 8
    f = r.draw(np.random.default_rng(0), 4000)
    assert f["box"].shape == (4000, 1, 4) and (f["box"][..., 2:] == 8).all()
    assert f["box"][..., :2].min() == 0 and f["box"][..., :2].max() == 24  # RandomCrop(8) of 32: 0..24
    assert 0.45 < f["flip"].mean() < 0.55
    crops = torch.randn(3, 3, 8, 8)
    subs = m.subpatches(crops).view(3, 4, 3, 7, 7)
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.equal(subs[:, k], crops[:, :, dy : dy + 7, dx : dx + 7])


def test_subpatches_random_negative_is_the_previous_crops_subpatch(tiny_cfg, monkeypatch):
    import fastssl.methods.layerwise as lw

    m = make(tiny_cfg, "method.pairs=subpatches")
    seen = {}
    monkeypatch.setattr(lw, "triplet_loss_eager", lambda a, p, n, **kw: seen.update(a=a, p=p, n=n) or a.sum() * 0)
    crops = torch.randn(5, 3, 8, 8)
    m([crops], torch.arange(5))
    e = m.embed(m.subpatches(crops)).view(5, 4, -1)
    assert seen["a"].shape[0] == 30
    i, j = zip(*combinations(range(4), 2))
    assert torch.equal(seen["a"], e[:, list(i)].flatten(0, 1)) and torch.equal(seen["p"], e[:, list(j)].flatten(0, 1))
    assert torch.equal(seen["n"], e.roll(1, 0)[:, list(i)].flatten(0, 1))


def test_flatten_embedding_and_raw_input(tiny_cfg):
    m = make(tiny_cfg, "method.embedding=flatten", "method.input=raw")
    x = torch.randn(4, 3, 7, 7)
    conv = m.backbone.stages["layer1"][0]
    assert torch.equal(m.embed(x), F.relu(conv(x)).flatten(1))
    assert m.embed(x).shape == (4, 16 * 2 * 2)
    src = SimpleNamespace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    img = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(type(m).eval_input(m.cfg, src)(img), img.float() / 255.0)
    from fastssl.methods.layerwise import _RawPixels

    seen = _RawPixels(src)  # the loaders' source: mean 0, std 1, so that their Normalise gives x / 255
    assert seen.mean == (0.0,) * 3 and seen.std == (1.0,) * 3 and seen._source is src


@pytest.mark.parametrize(
    "overrides, key, msg",
    [
        (["method.distance=l1"], "method.distance", "is not one of cosine, euclidean, sqeuclidean"),
        (["method.mining=hard"], "method.mining", "is not one of random, semihard"),
        (["method.pairs=two"], "method.pairs", "is not one of one, subpatches"),
        (["method.embedding=mean"], "method.embedding", "is not one of maxpool, flatten"),
        (["method.input=standardised"], "method.input", "is not one of normalised, raw"),
        (["method.hardest=true", "method.mining=semihard"], "method.hardest", "cannot be combined"),
        (["method.hardest=true", "method.pairs=subpatches"], "method.hardest", "cannot be combined"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tiny_cfg, overrides, key, msg):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(*overrides, config=f"{ROOT}/{CFG}")
    assert str(e.value).startswith(key) and msg in str(e.value)


def test_authors_config_loads(tiny_cfg):
    cfg = tiny_cfg("data.source=builtin", config=f"{ROOT}/configs/layerwise/cifar100-authors.yaml")
    m = cfg.method
    assert (m.distance, m.margin, m.mining, m.pairs, m.embedding, m.input) == (
        "sqeuclidean",
        2.0,
        "semihard",
        "subpatches",
        "flatten",
        "raw",
    )
    assert cfg.optim.schedule == "step" and cfg.optim.milestones == [65] and cfg.train.epochs == 100


# ---- the authors' transfer classifier


def test_authors_classifier_and_augmentation():
    from fastssl.eval.transfer import AuthorsClassifier, crop_flip

    conv = torch.nn.Conv2d(3, 16, 6)
    net = AuthorsClassifier(conv, 16, 32, 10)
    y = net(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))  # ends in a softmax, as theirs
    assert net.convnet[3].out_channels == 512 and net.fc[1].in_features == 5 * 5 * 512 and net.fc[1].out_features == 512
    assert sum(isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for mod in net.modules()) == 3
    black = torch.full((1, 3, 1, 1), -2.0)
    x = torch.rand(64, 3, 32, 32)
    out = crop_flip(black)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for k in range(64):  # each image: a 32 px window of the 4 px padded image, flipped or not
        big = black.expand(1, 3, 40, 40).clone()[0]
        big[:, 4:36, 4:36] = x[k]
        hits = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (0, 1)
            if torch.equal(
                out[k], big[:, dy : dy + 32, dx : dx + 32].flip(2) if f else big[:, dy : dy + 32, dx : dx + 32]
            )
        ]
        assert hits, k


def test_transfer_with_the_authors_classifier():
    from fastssl.config import EvalConfig
    from fastssl.data.sources import Split, make_builtin
    from fastssl.eval.transfer import transfer
    from fastssl.models import shallow

    x, y = make_builtin(96, 32, 4, seed=0)
    src = SimpleNamespace(
        train=Split(images=x[:64], labels=y[:64]),
        test=Split(images=x[64:], labels=y[64:]),
        image_size=32,
        num_classes=4,
    )
    settings = dict(transfer_epochs=1, transfer_runs=1, transfer_freeze=True, batch_size=32)
    res = transfer(
        shallow(8),
        src,
        lambda b: b.float() / 255.0,
        EvalConfig(**settings, transfer_classifier="authors"),
        device="cpu",
        log=lambda s: None,
    )
    assert res["classifier"] == "authors" and len(res["runs"]) == 1 and 0 <= res["accuracy"] <= 100
    with pytest.raises(ConfigError, match="eval.transfer_classifier"):
        transfer(
            shallow(8),
            src,
            lambda b: b.float() / 255.0,
            EvalConfig(**settings, transfer_classifier="big"),
            device="cpu",
        )


# ---- short training runs, one per new mode


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        ["method.distance=sqeuclidean"],
        ["method.mining=semihard", "method.distance=sqeuclidean", "method.margin=2.0"],
        ["method.pairs=subpatches", "method.embedding=flatten", "method.input=raw"],
        AUTHORS,
    ],
    ids=["sqeuclidean", "semihard", "subpatches-flatten-raw", "authors"],
)
def test_short_run_per_mode(tmp_path, mode):
    out = tmp_path / "run"
    run(train_cmd(out, *mode, "train.max_steps=3", "train.monitor_every=0", config=CFG))
    recs = read_metrics(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    if "method.mining=semihard" in mode:
        assert all(0 < r["triplets"] <= 1 for r in recs if "loss" in r)
    assert (out / "checkpoints" / "last.pt").is_file()
