"""Layer-wise contrastive: adjacent overlapping patches, stage-by-stage training, transfer."""

import numpy as np
import pytest
import torch

from conftest import ROOT, eval_trained_and_random, kill_and_resume, load_ckpt, read_metrics, run, train_cmd
from fastssl.config import ConfigError

CFG = "configs/layerwise/builtin.yaml"


def make(tiny_cfg, *overrides):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg(*overrides, config=f"{ROOT}/{CFG}")
    return get_method("layerwise")(cfg, build_backbone(cfg.model, 32), 32)


def test_patches_are_adjacent_overlapping_and_in_the_image(tiny_cfg):
    m = make(tiny_cfg, "method.max_shift=3")
    f = m.recipe().draw(np.random.default_rng(0), 2000)
    boxes, flips = f["box"], f["flip"]
    assert (boxes[..., 2:] == 7).all() and not flips.any()
    shift = boxes[:, 1, :2] - boxes[:, 0, :2]
    assert (np.abs(shift) <= 3).all() and (np.abs(shift).max(1) >= 1).all()  # adjacent, never identical
    assert (np.abs(shift) < 7).all()  # so they overlap
    assert (boxes[..., :2] >= 0).all() and (boxes[..., :2] + 7 <= 32).all()
    assert len(np.unique(shift, axis=0)) == 7 * 7 - 1  # every non-zero shift occurs


def test_pipeline_patches_come_from_the_right_images(tiny_cfg):
    from fastssl.data.executors.dali import DaliExecutor
    from fastssl.data.ops import HSV
    from fastssl.data.plan import make_epoch_plan
    from fastssl.data.recipe import Recipe
    from fastssl.data.sources import Split, make_builtin

    m = make(tiny_cfg)
    x, _ = make_builtin(64, 32, 10, seed=0)
    r = m.recipe()
    raw = Recipe(r.draw, [op for op in r.ops if not isinstance(op, HSV)], r.views, r.size)  # no colour change
    loader = DaliExecutor(Split(images=x), raw, 16, 0, 0, 1, "cpu", 32, (0.0,) * 3, (1 / 255,) * 3, num_threads=1)
    loader.set_epoch(0)
    batch = next(iter(loader))
    s = make_epoch_plan(64, 16, m.recipe().draw, 0, 0).step(0)
    idx, boxes = s.index, s["box"]
    assert torch.equal(batch["index"], torch.from_numpy(idx))
    for j in range(16):
        for v in range(3):
            y, xx, h, w = boxes[j, v]
            want = x[idx[j], y : y + h, xx : xx + w].transpose(2, 0, 1).astype(np.float32)
            np.testing.assert_allclose(batch["views"][v][j].numpy(), want, atol=1e-3)


def test_negative_comes_from_another_image(tiny_cfg, monkeypatch):
    import fastssl.methods.layerwise as lw

    m = make(tiny_cfg)
    seen = {}
    monkeypatch.setattr(lw, "triplet_loss_eager", lambda a, p, n, **kw: seen.update(a=a, p=p, n=n) or a.sum() * 0)
    views = [torch.randn(5, 3, 7, 7) for _ in range(3)]
    m(views, torch.arange(5))
    third = m.embed(views[2])
    assert torch.equal(seen["n"], third.roll(1, 0))  # image i-1's third patch
    assert torch.equal(seen["a"], m.embed(views[0])) and torch.equal(seen["p"], m.embed(views[1]))


@pytest.mark.parametrize(
    "overrides, key, msg",
    [
        (["method.patch_sizes=[5]"], "method.patch_sizes[0]", "5 px is smaller than the 7 px receptive field"),
        (["method.layers=2", "method.patch_sizes=[7,12]"], "method.patch_sizes[1]", "12 px is smaller than the 19 px"),
        (["method.max_shift=7"], "method.max_shift", "so that 7 px patches overlap"),
        (["model.arch=convnet"], "model.arch", "layerwise trains the 'shallow' net"),
        (["method.distance=l1"], "method.distance", "is not one of"),
        (["method.color.saturation=[1.5,0.5]"], "method.color.saturation", "must be a range [lo, hi]"),
    ],
)
def test_bad_patches_are_refused(tiny_cfg, overrides, key, msg):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(*overrides, config=f"{ROOT}/{CFG}")
    assert str(e.value).startswith(key) and msg in str(e.value)


def test_min_patch_follows_the_receptive_field():
    from fastssl.models import shallow_min_patch

    assert [shallow_min_patch(k) for k in (1, 2, 3)] == [7, 19, 43]
    assert shallow_min_patch(1, kernel=5) == 6


@pytest.mark.slow
def test_two_stages_freeze_the_first_and_write_filters(tmp_path):
    out = tmp_path / "two"
    run(train_cmd(out, "method.layers=2", "train.epochs=1", "data.batch_size=64", config=CFG))
    after_stage1 = torch.load(out / "filters" / "layer1.pt")
    final = load_ckpt(out / "checkpoints" / "last.pt")["model"]
    assert torch.equal(final["backbone.stages.layer1.0.weight"], after_stage1)  # untouched by stage 2
    assert torch.equal(torch.load(out / "filters" / "layer2.pt"), final["backbone.stages.layer2.0.weight"])
    init = make_init_layer2()
    assert not torch.equal(final["backbone.stages.layer2.0.weight"], init)  # stage 2 trained
    recs = read_metrics(out)
    assert {r["stage"] for r in recs} == {0, 1}
    assert (out / "filters" / "layer1.png").stat().st_size > 200


def make_init_layer2():
    from conftest import TINY
    from fastssl.config import load_config
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = load_config(f"{ROOT}/{CFG}", [*TINY, "method.layers=2", "data.batch_size=64"])
    torch.manual_seed(cfg.seed)
    m = get_method("layerwise")(cfg, build_backbone(cfg.model, 32), 32)
    return m.backbone.stages["layer2"][0].weight.detach()


@pytest.mark.slow
def test_sigkill_in_second_stage_then_resume_equals_uninterrupted(tmp_path):
    common = ["method.layers=2", "train.epochs=2", "train.ckpt_every_steps=3", "data.batch_size=64"]  # 8 steps/stage
    ref, crashed, resumed, kill_at = kill_and_resume(tmp_path, common, CFG, (9, 16))  # inside the second stage
    assert 8 <= crashed["step"] <= kill_at
    a, b = ref["model"], resumed["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.learning
def test_transferred_first_layer_beats_random_init(tmp_path):
    """Frozen first layer in the small classifier: learned filters vs the same net untrained."""
    out = tmp_path / "learn"
    run(train_cmd(out, config=CFG, tiny=False))
    assert (out / "filters" / "layer1.png").is_file()
    learned, random = eval_trained_and_random(out, "transfer", "eval.transfer_runs=2", "eval.transfer_epochs=4")
    assert learned["frozen"] and len(learned["runs"]) == 2
    assert learned["accuracy"] >= random["accuracy"] + 5.0, (learned, random)
