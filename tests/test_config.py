"""Every bad value is refused before anything is built, with one line naming the key."""

import os

import pytest

from conftest import PY, ROOT, TINY, run
from fastssl.config import ConfigError, load_config

CFG = os.path.join(ROOT, "configs/sc/builtin.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),  # unknown key (typo)
        ("train.epochs=abc", "train.epochs"),  # wrong type
        ("train.epochs=0", "train.epochs"),
        ("data.source=imagenet", "data.source"),
        ("data.pipeline=dali", "data.pipeline"),
        ("method.patch_size=40", "method.patch_size"),  # patch larger than the 32 px image
        ("method.layers=[block9]", "method.layers[0]"),
        ("model.arch=vgg", "model.arch"),
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=100000", "data.batch_size"),  # more than the data
        ("method.name=nope", "method.name"),
        ("method.color.hue=500", "method.color.hue"),
        ("eval.layer=layer4", "eval.layer"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CFG, [override])
    msg = str(e.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_paths_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path: not a directory: .*nowhere"):
        load_config(CFG, ["data.source=stl10", f"data.path={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"^data.path: required"):
        load_config(CFG, ["data.source=cifar10"])
    with pytest.raises(ConfigError, match=r"^--config: file not found"):
        load_config(str(tmp_path / "missing.yaml"), [])


def test_dali_gpu_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match=r"^data.pipeline: dali-gpu needs a CUDA GPU"):
        load_config(CFG, ["data.pipeline=dali-gpu"])


def test_good_config_and_overrides():
    cfg = load_config(CFG, ["train.epochs=1", "data.pipeline=torch", "out_dir=runs/x"])
    assert cfg.train.epochs == 1 and cfg.data.pipeline == "torch" and cfg.out_dir == "runs/x"
    assert cfg.method.name == "sc" and cfg.method.flip is True


def test_cli_error_is_one_line_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    p = run([PY, "fastssl/train.py", "--config", CFG, f"out_dir={out}", "method.patch_size=99"], check=False)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [
        "fastssl: config error: method.patch_size: 99 px is impossible for 32x32 images (need 4 <= patch <= 32)"
    ]
    assert not out.exists()


SHIPPED = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, fs in os.walk(os.path.join(ROOT, "configs"))
    for f in fs
    if f.endswith(".yaml")
)


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_parse(path, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, path))
    assert cfg.method.name == path.split(os.sep)[1]
    if cfg.data.source == "builtin":
        load_config(os.path.join(ROOT, path), [])
    else:  # the real data is not here: the error must be about the path, nothing else
        with pytest.raises(ConfigError, match=r"^data.path"):
            load_config(os.path.join(ROOT, path), [f"data.path={tmp_path}"])


def test_milestones_are_checked_only_by_the_step_schedule():
    """Shortening a run whose config has step milestones, with another schedule, is accepted (the
    milestones are not used); with the step schedule they are still checked."""
    path = os.path.join(ROOT, "configs/invp/builtin.yaml")
    cfg = load_config(path, [*TINY, "train.epochs=4", "optim.schedule=cosine", "optim.milestones=[400.0]"])
    assert cfg.optim.schedule == "cosine"
    with pytest.raises(ConfigError, match=r"^optim.milestones\[0\]: 400.0 is outside \(0, train.epochs=4\]"):
        load_config(path, [*TINY, "train.epochs=4", "optim.schedule=step", "optim.milestones=[400.0]"])
