"""Every DALI graph the project builds, built for ``device='gpu'`` on any machine.

Without CUDA DALI still defines a GPU pipeline and builds its Python graph (``pipe.build()``, the
part that needs a GPU, is never called here): that is where DALI refuses misplaced arguments (a
GPU tensor as a named argument).  Each test builds one graph as the project configures it and
checks that it builds and that its heavy operators run on the GPU (the decoder: 'mixed').
"""

import dataclasses
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from fastssl.data.dali_check import (
    PipelineBuildError,
    check_gpu_graph,
    crop_pipeline,
    graph_ops,
    op_name,
)
from fastssl.data.lab import ColorSplit
from fastssl.data.ops import HSV, Op
from fastssl.data.recipe import Recipe
from fastssl.data.sources import Split, build_source
from fastssl.methods.exemplar.surrogate import surrogate_pipeline

pytest.importorskip("nvidia.dali")  # (the modules above import DALI only when a graph is built)

# Operators allowed on the CPU: the inputs, and the per-sample scalars picked out of them for
# named arguments (which DALI wants on the CPU).
CPU_OK = {"fn.external_source", "fn.constant", "fn._tensor_subscript"}
EXEMPLAR = [
    "method.num_classes=64",
    "method.patches_per_class=8",
    "method.val_patches_per_class=0",
    "method.surrogate_dir=null",
]


def assert_on_gpu(ops, heavy):
    """Each operator of ``heavy`` (name -> count) is in the graph that often, on the GPU (a
    decoder: 'mixed'); nothing but inputs and argument bookkeeping runs on the CPU."""
    for name, count in heavy.items():
        want = "mixed" if name.startswith("fn.decoders.") else "gpu"
        assert [d for n, d in ops if n == name] == [want] * count, (name, ops)
    assert {n for n, d in ops if d == "cpu"} <= CPU_OK, ops
    assert all(d == "gpu" for n, d in ops if n.startswith("math.")), ops


def gpu_cfg(cfg):
    """A copy of a loaded config with data.pipeline=dali-gpu (config.validate refuses that
    without CUDA, so it is set after validation)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg))
    c.data.pipeline = "dali-gpu"
    return c


@pytest.fixture
def loader_graphs(monkeypatch):
    """The graphs the DALI loaders build on first iteration, recorded instead of run: the
    loaders' DALIGenericIterator is replaced by one that only builds the Python graph."""
    import nvidia.dali.plugin.pytorch as dali_torch

    graphs = []

    class GraphOnly:
        def __init__(self, pipes, names, **kw):
            graphs.append(graph_ops(pipes[0]))

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(dali_torch, "DALIGenericIterator", GraphOnly)

    def run(loader):
        loader.set_epoch(0)
        assert list(loader) == []
        return graphs[-1]

    return run


def as_folder(src):
    """``src`` with its pre-training split as encoded files of 200 x 300 px (a folder source; the
    files are never read)."""
    n = len(src.pretrain)
    return dataclasses.replace(
        src, pretrain=Split(files=[f"img{i}.png" for i in range(n)], sizes=np.tile(np.int32([200, 300]), (n, 1)))
    )


def method_and_source(tiny_cfg, name, *overrides, encoded=False):
    """(dali-gpu config, data source, method) as train.py builds them for ``configs/<name>/builtin.yaml``;
    ``encoded``: as a folder source."""
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(*overrides, config=f"{ROOT}/configs/{name}/builtin.yaml")
    src = build_source(cfg)
    src = as_folder(src) if encoded else src
    m = get_method(name)(cfg, build_backbone(cfg.model, src.image_size), src.image_size, len(src.pretrain))
    return gpu_cfg(cfg), src, m


def splitbrain_ops(rescale):
    """The ColorSplit operators of one view (Lab space)."""
    ops = {
        "fn.lookup_table": 1,
        "fn.coord_transform": 2,
        "fn.transpose": 1,
        "fn.reshape": 1,
        "fn.reductions.mean": 1,
        "fn.cast": 2,
        "math.cbrt": 1,
    }
    return {**ops, "fn.reductions.min": 1, "fn.reductions.max": 1} if rescale else ops


# (config, overrides, heavy operators of the crop graph)
RECIPES = {
    "sc": ("sc", [], {"fn.slice": 2, "fn.hsv": 2, "fn.crop_mirror_normalize": 2, "fn.resize": 0}),
    "layerwise": ("layerwise", [], {"fn.slice": 3, "fn.hsv": 3, "fn.crop_mirror_normalize": 3}),
    "invp": (
        "invp",
        ["method.grayscale=0.2"],
        {"fn.slice": 1, "fn.resize": 1, "fn.hsv": 1, "fn.crop_mirror_normalize": 1},
    ),
    "invp-grey-blur": (
        "invp",
        ["method.grayscale=0.2", "method.blur=0.5", "method.flip=true"],
        {
            "fn.slice": 1,
            "fn.resize": 1,
            "fn.flip": 0,
            "fn.hsv": 1,
            "fn.coord_transform": 1,
            "fn.gaussian_blur": 1,
            "fn.crop_mirror_normalize": 1,
        },
    ),
    "splitbrain-lab": (
        "splitbrain",
        [],
        {"fn.slice": 1, "fn.flip": 1, "fn.crop_mirror_normalize": 0, **splitbrain_ops(False)},
    ),
    "splitbrain-rescaled": (
        "splitbrain",
        ["method.rescale=true"],
        {"fn.slice": 1, "fn.flip": 1, **splitbrain_ops(True)},
    ),
    "splitbrain-rgb": (
        "splitbrain",
        ["method.space=rgb"],
        {"fn.slice": 1, "fn.flip": 1, "fn.lookup_table": 0, "fn.cast": 3, "fn.reductions.mean": 1},
    ),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_method_crop_graph_builds_on_the_gpu(tiny_cfg, loader_graphs, recipe):
    """build_loader with data.pipeline=dali-gpu checks the graph and the loader builds that same
    graph: slicing, resizing, colour change, normalisation (or the Lab targets) on the GPU."""
    from fastssl.data.executors.dali import DaliExecutor

    name, overrides, heavy = RECIPES[recipe]
    cfg, src, m = method_and_source(tiny_cfg, name, *overrides)
    assert m.recipe().has(HSV) == ("fn.hsv" in heavy)  # colour change on where the recipe has it
    m.begin_stage(0, src)
    loader = m.loader(cfg, src, device_id=0)  # runs check_gpu_graph
    assert isinstance(loader, DaliExecutor)
    ops = loader_graphs(loader)
    assert_on_gpu(ops, heavy)
    assert ops == graph_ops(
        crop_pipeline(m.recipe(), src, src.pretrain, cfg.data.batch_size)
    )  # the check sees this graph


@pytest.mark.parametrize("workers", [0, 2], ids=["main-thread", "reader-workers"])
@pytest.mark.parametrize("name", ["sc", "invp", "splitbrain", "layerwise"])
def test_folder_crop_graph_decodes_regions_on_the_gpu(tiny_cfg, loader_graphs, name, workers):
    """Encoded files of known sizes: the mixed ROI decoder (hardware share as configured) over the
    region the views cover, then each view sliced and resized on the GPU; the files' bytes from
    the parallel reader source or the main one; no whole-image decode, no centre crop."""
    cfg, src, m = method_and_source(
        tiny_cfg, name, f"data.reader_workers={workers}", "data.hw_decoder_load=0.4", encoded=True
    )
    loader = m.loader(cfg, src, device_id=0)
    assert loader.whole and loader.parallel == (workers > 0)
    ops = loader_graphs(loader)
    r = m.recipe()
    assert_on_gpu(
        ops,
        {"fn.decoders.image_slice": 1, "fn.decoders.image": 0, "fn.crop": 0, "fn.slice": r.views, "fn.resize": r.views},
    )
    pipe = crop_pipeline(r, src, src.pretrain, cfg.data.batch_size, workers, 0.4)
    assert graph_ops(pipe) == ops  # the check sees this graph
    (dec,) = [o for o in pipe._ops if op_name(o) == "fn.decoders.image_slice"]
    spec = str(dec._op._spec)
    assert "hw_decoder_load: 0.4" in spec and "axis_names: HW" in spec and "normalized_anchor: False" in spec


@pytest.fixture(scope="module")
def exemplar():
    """(dali-gpu config, source, seed surrogate set, PCA basis) of configs/exemplar/builtin.yaml, shrunk."""
    from conftest import TINY
    from fastssl.config import load_config
    from fastssl.methods.exemplar import seed_surrogate_set

    cfg = load_config(f"{ROOT}/configs/exemplar/builtin.yaml", [*TINY, *EXEMPLAR])
    src = build_source(cfg)
    return (gpu_cfg(cfg), src, *seed_surrogate_set(cfg, src))


@pytest.mark.parametrize("stretch", [True, False], ids=["stretch", "no-stretch"])
@pytest.mark.parametrize("encoded", [False, True], ids=["arrays", "encoded"])
def test_exemplar_surrogate_graph_builds_on_the_gpu(exemplar, loader_graphs, encoded, stretch):
    """The surrogate-patch graph (what ExemplarCNN.make_loader builds): warp_affine's matrix as its
    GPU input, the colour matrices as CPU named arguments, all arithmetic on the GPU (the bug:
    the matrices as GPU named arguments, which DALI refuses); with the authors' stretch (the
    default) and without it (the text's)."""
    from omegaconf import OmegaConf

    from fastssl.data.executors.dali import DaliExecutor
    from fastssl.methods.exemplar.materialised import build_surrogate_loader

    cfg, src, sset, pca = exemplar
    src = as_folder(src) if encoded else src
    aug = OmegaConf.merge(cfg.method.aug, {"stretch": stretch})
    loader = build_surrogate_loader(cfg, src, sset, aug, pca, device_id=0)  # runs check_gpu_graph
    assert isinstance(loader, DaliExecutor)
    ops = loader_graphs(loader)
    heavy = {"fn.warp_affine": 1, "fn.coord_transform": 1, "fn.stack": 1, "fn.cast": 1}
    assert_on_gpu(ops, {**heavy, **({"fn.decoders.image": 1, "fn.resize": 1, "fn.crop": 1} if encoded else {})})
    want = surrogate_pipeline(cfg.method.patch_size, encoded, src.image_size, cfg.data.batch_size, aug)
    assert ops == graph_ops(want)
    assert ("fn.reductions.min", "gpu") in ops if stretch else ("fn.reductions.min", "gpu") not in ops


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
def test_lab_benchmark_graph_builds_on_the_gpu(monkeypatch, rescale):
    """benchmarks/lab.py's dali-gpu runner: its pipe.build() (CUDA) builds the Python graph only."""
    from nvidia.dali import Pipeline

    from benchmarks.lab import dali_runner

    graphs = []
    monkeypatch.setattr(Pipeline, "build", lambda pipe: graphs.append(graph_ops(pipe)))
    images = np.zeros((4, 32, 32, 3), np.uint8)
    dali_runner(images, 2, ColorSplit(space="lab", rescale=rescale, factor=8), "gpu", 1)
    assert_on_gpu(graphs[0], splitbrain_ops(rescale))


def misplaced(op: str):
    """A pipeline factory whose one operator gets a GPU tensor where DALI wants a CPU one."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def pipe():
        x = fn.external_source(source=[], batch=True).gpu()
        m = fn.external_source(source=[], batch=True).gpu()
        if op == "warp_affine":
            return fn.warp_affine(x, matrix=m, size=(8, 8))
        return fn.flip(x, device="cpu")  # a CPU operator on a GPU input

    return pipe


def test_check_gpu_graph_turns_a_refusal_into_one_line():
    with pytest.raises(PipelineBuildError) as e:
        check_gpu_graph(misplaced("warp_affine"), "the exemplar surrogate graph")
    assert str(e.value) == (
        "data.pipeline=dali-gpu: the exemplar surrogate graph cannot be built: "
        "fn.warp_affine: Named arguments must be on CPU (matrix); "
        "use data.pipeline=dali-cpu or data.pipeline=torch"
    )
    with pytest.raises(PipelineBuildError, match=r"the test graph cannot be built: fn\.flip: .*incompatible dev") as e:
        check_gpu_graph(misplaced("flip"), "the test graph")
    assert "\n" not in str(e.value) and str(e.value).endswith("use data.pipeline=dali-cpu or data.pipeline=torch")
    assert isinstance(e.value, ValueError)


def test_check_gpu_graph_is_cheap_and_silent_on_a_good_graph(tiny_cfg):
    _, src, m = method_and_source(tiny_cfg, "sc")
    check_gpu_graph(
        lambda: crop_pipeline(m.recipe(), src, src.pretrain, 32), "the sc crop graph"
    )  # warm: DALI imported
    t = time.perf_counter()
    check_gpu_graph(lambda: crop_pipeline(m.recipe(), src, src.pretrain, 32), "the sc crop graph")
    assert time.perf_counter() - t < 0.5


class _GpuArgument(Op):
    """A broken op: a GPU tensor as a named argument of fn.rotate."""

    def dali(self, x, f, ctx):
        from nvidia.dali import fn

        return fn.rotate(x, angle=fn.random.uniform(range=[-10.0, 10.0]).gpu())


def test_build_loader_refuses_a_broken_gpu_graph_before_training(tiny_cfg):
    """data.pipeline=dali-gpu: build_loader builds the graph at once and names the operator."""

    cfg, src, m = method_and_source(tiny_cfg, "sc")
    r = m.recipe()
    m.recipe = lambda: Recipe(r.draw, r.ops[:-1] + [_GpuArgument()], r.views, r.size, r.name)
    with pytest.raises(
        PipelineBuildError,
        match=r"^data\.pipeline=dali-gpu: the sc crop graph cannot be built: "
        r"fn\.rotate: Named arguments must be on CPU \(angle\); use ",
    ):
        m.loader(cfg, src, device_id=0)
