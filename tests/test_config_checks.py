"""The one validation idiom (fastssl.errors.check/choice, Literal fields checked on merge) and
"a setting is validated only when it is used": a setting of a feature that is off is not refused."""

import os
import typing

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY
from fastssl.config import ConfigError, load_config
from fastssl.errors import check, choice


def cfg_path(method: str) -> str:
    return os.path.join(ROOT, f"configs/{method}/builtin.yaml")


def test_check_and_choice_raise_one_line_naming_the_key():
    check(True, "a.b", "never raised")
    choice("x", "a.b", ("x", "y"))
    with pytest.raises(ConfigError, match=r"^a\.b: must be >= 1, got 0$"):
        check(False, "a.b", "must be >= 1, got 0")
    with pytest.raises(ConfigError, match=r"^a\.b: 'z' is not one of x, y$"):
        choice("z", "a.b", ("x", "y"))


@pytest.mark.parametrize(
    "method, override, message",
    [
        ("sc", "optim.schedule=linear", "optim.schedule: 'linear' is not one of cosine, step, constant"),
        ("sc", "optim.name=adam", "optim.name: 'adam' is not one of sgd, adamw"),
        ("sc", "train.precision=fp8", "train.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
        ("sc", "eval.svm_c_select=val", "eval.svm_c_select: 'val' is not one of cv, test"),
        ("invp", "method.positives=all", "method.positives: 'all' is not one of propagation, knn, authors"),
        ("invp", "method.graph_index=lsh", "method.graph_index: 'lsh' is not one of auto, flat, ivf, hnsw"),
        ("splitbrain", "method.space=hsv", "method.space: 'hsv' is not one of lab, rgb"),
        ("exemplar", "method.cluster.features=raw", "method.cluster.features: 'raw' is not one of pooled, authors"),
        ("exemplar", "method.aug.draw=normal", "method.aug.draw: 'normal' is not one of loguniform, uniform"),
    ],
)
def test_literal_fields_are_refused_on_merge_in_the_words_of_choice(method, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path(method), [*TINY, override])
    assert str(e.value) == message


def test_a_literal_refused_in_the_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: sc\noptim:\n  schedule: warm\n")
    with pytest.raises(ConfigError, match=r"^optim.schedule: 'warm' is not one of cosine, step, constant$"):
        load_config(str(path), TINY)


def test_choices_stay_plain_strings_through_a_stored_config(tmp_path):
    """Literal fields hold str: the saved config.yaml, the checkpoint's container and a reload
    give the same plain values (no Enum objects)."""
    cfg = load_config(cfg_path("invp"), [*TINY, "optim.schedule=step", "method.positives=knn"])
    stored = OmegaConf.to_container(cfg, resolve=True)
    assert type(stored["optim"]["schedule"]) is str and stored["method"]["positives"] == "knn"
    again = load_config(cfg, [])
    assert OmegaConf.to_container(again, resolve=True) == stored
    assert f"{again.optim.schedule}" == "step"


def test_literal_choices_and_their_tuples_agree():
    from fastssl.data.lab import AB_BINS, SPACES
    from fastssl.knn import GRAPH_INDEXES, KINDS
    from fastssl.methods.exemplar.surrogate import SURROGATE_MODES
    from fastssl.models.heads import HEADS
    from fastssl.registry import PIPELINES, PRECISIONS

    assert PIPELINES == ("auto", "dali-gpu", "dali-cpu", "torch", "tensor", "synthetic")
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    assert HEADS == ("linear", "mlp") and KINDS == ("flat", "ivf", "hnsw") and GRAPH_INDEXES[0] == "auto"
    assert SPACES == ("lab", "rgb") and AB_BINS == ("seed100", "grid313")
    assert SURROGATE_MODES == ("per_epoch", "fixed")
    from fastssl.config import OptimConfig

    assert typing.get_args(typing.get_type_hints(OptimConfig)["schedule"]) == ("cosine", "step", "constant")


# ---- a setting is validated only when it is used


def test_gammas_are_checked_only_by_the_step_schedule():
    path = cfg_path("invp")
    bad = ["optim.gamma=2.0", "optim.gammas=[0.5, 0.5]", "optim.milestones=[1.0]"]
    cfg = load_config(path, [*TINY, "optim.schedule=cosine", *bad])
    assert cfg.optim.gamma == 2.0
    with pytest.raises(ConfigError, match=r"^optim.gamma: must be in \(0, 1\], got 2.0"):
        load_config(path, [*TINY, "optim.schedule=step", *bad])
    with pytest.raises(ConfigError, match=r"^optim.gammas: 2 factors for 1 milestones"):
        load_config(path, [*TINY, "optim.schedule=step", *bad[1:]])


def test_monitor_sizes_are_checked_only_when_the_monitor_is_on():
    cfg = load_config(cfg_path("sc"), [*TINY, "train.monitor_every=0", "train.monitor_bank=0", "train.monitor_test=0"])
    assert cfg.train.monitor_every == 0
    with pytest.raises(ConfigError, match=r"^train.monitor_bank: must be >= 1, got 0"):
        load_config(cfg_path("sc"), [*TINY, "train.monitor_every=1", "train.monitor_bank=0"])


def test_blur_settings_are_checked_only_when_views_are_blurred():
    path, bad = cfg_path("invp"), ["method.blur_sigma=[2.0, 1.0]", "method.blur_kernel=4"]
    assert load_config(path, [*TINY, "method.blur=0.0", *bad]).method.blur_kernel == 4
    with pytest.raises(ConfigError, match=r"^method.blur_sigma: must be \[lo, hi\] with 0 < lo <= hi"):
        load_config(path, [*TINY, "method.blur=0.5", *bad])
    with pytest.raises(ConfigError, match=r"^method.blur_kernel: must be an odd number of pixels, got 4"):
        load_config(path, [*TINY, "method.blur=0.5", "method.blur_kernel=4"])


def test_exemplar_cluster_settings_are_checked_only_when_clustering_is_on():
    path, bad = cfg_path("exemplar"), ["method.cluster.fraction=1.5", "method.cluster.max_size=1"]
    assert load_config(path, ["method.cluster.enabled=false", *bad]).method.cluster.fraction == 1.5
    with pytest.raises(ConfigError, match=r"^method.cluster.fraction: must be in \(0, 1\), got 1.5"):
        load_config(path, ["method.cluster.enabled=true", *bad])


def test_exemplar_val_classes_are_checked_only_with_validation_patches():
    path = cfg_path("exemplar")
    assert load_config(path, ["method.val_patches_per_class=0", "method.val_classes=0"]).method.val_classes == 0
    with pytest.raises(ConfigError, match=r"^method.val_classes: must be >= 1, got 0"):
        load_config(path, ["method.val_patches_per_class=2", "method.val_classes=0"])
