"""kNN costs as the work grows (issue 25): the scaling sweep of benchmarks/knn.py at tiny sizes,
its fit and recall helpers, fastssl.knn.graph_memory against an InvP model's real buffers and
FAISS's real index structures, and fastssl.knn.choose_index."""

import json
import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastssl.knn as knn
from benchmarks import knn as bknn
from conftest import PY, ROOT, run
from fastssl.knn import IMAGENET_N, KINDS, KNNIndex, choose_index, graph_memory, index_bytes

H200_BYTES = 139 * 2**30


@pytest.mark.slow
def test_scale_mode_tiny_writes_rows_fits_and_plot(tmp_path):
    run(
        [
            PY,
            "-m",
            "benchmarks.knn",
            "--scale",
            "--sizes",
            "500",
            "1000",
            "2000",
            "--max-seconds",
            "60",
            "--out",
            str(tmp_path),
        ],
        timeout=600,
    )
    doc = json.loads((tmp_path / "knn-scale.json").read_text())
    assert doc["k"] == bknn.invp_graph_k() == 4 and doc["d"] == 128
    rows = {(r["kind"], r["n"]): r for r in doc["rows"]}
    for n in (500, 1000, 2000):
        for kind in ("flat", "ivf", "hnsw"):
            r = rows[(kind, n)]
            assert "skipped" not in r, r
            assert (
                r["build_s"] > 0 and r["search_s"] > 0 and r["total_s"] == pytest.approx(r["build_s"] + r["search_s"])
            )
            assert r["peak_rss_growth_bytes"] >= 0 and r["index_rss_bytes"] >= 0 and r["device"] == "cpu"
            assert r["recall_rows"] == n
            assert (r["recall"] == 1.0) if kind == "flat" else (0.0 <= r["recall"] <= 1.0)
        cagra = rows[("cagra", n)]
        if bknn.cagra_unavailable():  # this machine: a stated reason, not a crash
            assert cagra["skipped"] == bknn.cagra_unavailable()
    for kind in ("flat", "ivf", "hnsw"):
        f = doc["fits"][kind]
        assert f["points"] == 3 and math.isfinite(f["total_exponent"]) and f["total_s_at_imagenet_extrapolated"] > 0
    md = (tmp_path / "knn-scale.md").read_text()
    assert "Extrapolated (not measured)" in md and "| flat (cpu) | 2,000 |" in md and "N^" in md
    assert (tmp_path / "knn-scale.png").stat().st_size > 1000


def test_scale_points_past_the_cap_are_skipped_rows_not_crashes(tmp_path):
    rows = bknn.scale([300, 600], ["flat", "cagra"], 16, 4, max_seconds=1e-9, log=lambda *a, **k: None)
    by = {(r["kind"], r["n"]): r for r in rows}
    assert "skipped" not in by[("flat", 300)] and by[("flat", 300)]["recall"] == 1.0
    assert by[("flat", 600)]["skipped"].startswith("estimated")  # from the fit of the first point
    assert all("skipped" in by[("cagra", n)] for n in (300, 600)) or not bknn.cagra_unavailable()


def test_old_single_size_mode_still_works(tmp_path):
    assert (
        bknn.main(
            ["--n", "400", "--repeats", "1", "--warmup", "0", "--impls", "faiss-flat", "torch", "--out", str(tmp_path)]
        )
        == 0
    )
    rows = json.loads((tmp_path / "knn.json").read_text())["rows"]
    assert {r["k"] for r in rows} == {5} and len(rows) == 2


def test_fit_recall_and_self_dropping_helpers():
    ns = [1e4, 2e4, 4e4, 8e4]
    b, a = bknn.loglog_fit(ns, [3e-9 * n**2 for n in ns])
    assert b == pytest.approx(2.0) and a == pytest.approx(3e-9)
    assert bknn.estimate_seconds([(1000, 1.0)], 2000) == pytest.approx(4.0)  # one point: N^2
    assert bknn.estimate_seconds([(1000, 1.0), (2000, 2.0)], 4000) == pytest.approx(4.0)
    # drop_self equals knn_graph's own selection on a real search
    from fastssl.methods.invp import knn_graph

    bank = F.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    _, idx = KNNIndex(bank, "ip").search(bank, 5)
    assert np.array_equal(bknn.drop_self(idx.numpy(), 4), knn_graph(bank, 4).numpy())
    exact = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    assert bknn.recall_at_k(exact, exact) == 1.0
    assert bknn.recall_at_k(np.array([[4, 3, 9, -1], [-1, -1, -1, -1]]), exact) == pytest.approx(2 / 8)


def test_graph_memory_equals_an_invp_models_buffers(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    n = 20000
    cfg = tiny_cfg(config=f"{ROOT}/configs/invp/builtin.yaml")
    m = get_method("invp")(cfg, build_backbone(cfg.model, 32), 32, n)
    m.begin_epoch(0, fresh=True)  # the real graph build: the buffer keeps its dtype and shape
    assert (m.graph >= 0).all()
    dim, k = cfg.method.feat_dim, cfg.method.graph_k
    real = {name: b.numel() * b.element_size() for name, b in m.named_buffers() if name in ("bank", "graph")}
    gm = graph_memory(n, dim, k)
    assert real == {"bank": gm["bank"], "graph": gm["graph"]}
    assert gm["bank"] == n * dim * 4 and gm["graph"] == n * k * 8


def test_index_bytes_equal_faiss_structures():
    d = 32
    for n, kind in ((20000, "flat"), (20000, "ivf"), (5000, "hnsw")):
        x = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(2)), dim=1)
        owner = KNNIndex(x, "ip", use_gpu=False, kind=kind)  # kept alive: the downcast view does not own the index
        index = faiss.downcast_index(owner.index)
        if kind == "flat":
            real = index.codes.size()
        elif kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            lists = ivf.invlists
            real = (
                sum(lists.list_size(i) for i in range(lists.nlist)) * (ivf.code_size + 8) + ivf.quantizer.ntotal * d * 4
            )
        else:
            h = index.hnsw
            real = n * d * 4 + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        want = index_bytes(n, d, kind)
        assert (want == real) if kind != "hnsw" else (want == pytest.approx(real, rel=0.02)), (kind, want, real)


def test_imagenet_graph_fits_one_h200():
    import yaml

    with open(f"{ROOT}/configs/invp/imagenet-folder.yaml") as f:  # (load_config would want the images)
        method = yaml.safe_load(f)["method"]
    dim, k = method["feat_dim"], method["graph_k"]
    for kind in (None, *KINDS):
        gm = graph_memory(IMAGENET_N, dim, k, kind=kind)
        print(
            f"N={IMAGENET_N:,} D={dim} k={k} {gm['kind']}: "
            + ", ".join(
                f"{key} {gm[key] / 2**30:.3f} GiB"
                for key in (
                    "bank",
                    "graph",
                    "index",
                    "faiss_temp",
                    "search",
                    "graph_build",
                    "monitor",
                    "invp_monitor",
                    "peak",
                    "host",
                )
            )
        )
        assert gm["peak"] < H200_BYTES
        assert gm["bank"] == IMAGENET_N * 128 * 4 and gm["graph"] == IMAGENET_N * 4 * 8
    assert graph_memory(IMAGENET_N, dim, k, kind="hnsw")["index"] == 0  # hnsw is a host index


def test_choose_index_exact_while_affordable_then_approximate():
    assert choose_index(1000) == "flat" and choose_index(20000) == "flat"
    assert choose_index(IMAGENET_N) in ("ivf", "hnsw")
    picks = [choose_index(n) for n in (10**3, 10**4, 10**5, 10**6, IMAGENET_N, 10**7)]
    assert all(p in KINDS for p in picks)
    first_approx = next(i for i, p in enumerate(picks) if p != "flat")
    assert all(p != "flat" for p in picks[first_approx:])
    # on a GPU the exact graph is kept at any size (one GEMM per epoch)
    assert all(choose_index(n, on_gpu=True) == "flat" for n in (10**3, IMAGENET_N, 10**7))


def test_invp_graph_index_auto_resolves_by_bank_size_and_device(capsys, monkeypatch):
    """InvP's method.graph_index=auto is choose_index on its bank: flat for a small bank, the
    approximate kind for a CPU bank past FLAT_MAX_N (said once, naming the kind and the recall);
    an explicit kind is used as given."""
    from types import SimpleNamespace

    from fastssl.knn import FLAT_MAX_N
    from fastssl.methods.invp import InvariancePropagation

    monkeypatch.setattr(knn, "_SAID", set())

    def model(kind, n):
        return SimpleNamespace(cfg=SimpleNamespace(method=SimpleNamespace(graph_index=kind)), bank=torch.empty(n, 1))

    assert InvariancePropagation.graph_index(model("auto", 5000)) == "flat"
    big = InvariancePropagation.graph_index(model("auto", FLAT_MAX_N + 1))
    assert big == choose_index(FLAT_MAX_N + 1) != "flat"
    assert InvariancePropagation.graph_index(model("hnsw", 5000)) == "hnsw"
    assert InvariancePropagation.graph_index(model("flat", FLAT_MAX_N + 1)) == "flat"
    err = capsys.readouterr().err
    assert "method.graph_index=auto: flat for 5,000 bank rows on the CPU" in err
    assert f"{big} for {FLAT_MAX_N + 1:,} bank rows" in err and "recall@4" in err


def test_ivf_recall_mode_measures_against_exact_search():
    """benchmarks.knn --ivf-recall: with every list probed ivf is exhaustive (recall 1); with one
    list probed, the clustered bank (lists follow its clusters) keeps more neighbours than the
    random one."""
    rows = bknn.ivf_recall([3000], [1, 64], d=32, k=4, sample=200, log=lambda *_: None)
    got = {(r["bank"], r["nprobe"]): r["recall"] for r in rows}
    assert set(got) == {(b, p) for b in ("clustered", "random") for p in (1, 64)}
    assert got["clustered", 64] == 1.0 and got["random", 64] == 1.0  # 64 >= sqrt(3000) lists
    assert got["clustered", 1] > got["random", 1]
    assert all(r["sample"] == 200 and r["build_s"] > 0 for r in rows)


def test_sampled_exact_neighbours_equal_the_full_graphs_rows():
    """The sweep's recall over sampled rows (N where flat is skipped) compares against the sampled
    rows' exact neighbours with each row's own id removed, as in the full graph (the self of a
    sampled row is its database id, not its position in the sample)."""
    n, d, k = 2000, 16, 4
    pick = np.sort(np.random.default_rng(0).choice(n, 300, replace=False))
    x = bknn.unit_vectors(n, d, 0)
    full = bknn.drop_self(KNNIndex(x, "ip").search(x, k + 1)[1].numpy(), k)
    sampled = bknn.drop_rows(bknn.exact_sample(n, d, k, 0, pick), pick, k)
    assert not (sampled == pick[:, None]).any()
    assert np.array_equal(np.sort(sampled, 1), np.sort(full[pick], 1))
    assert bknn.recall_at_k(full[pick], sampled) == 1.0
