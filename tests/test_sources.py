"""Sources read the official formats: tiny files written here in those exact formats."""

import os

import numpy as np
import pytest

from fastssl.config import ConfigError
from formats import write_cifar, write_folder, write_stl10


def test_stl10_binaries_roundtrip(tmp_path, tiny_cfg):
    from fastssl.data.sources import build_source

    ref = write_stl10(tmp_path / "stl10_binary")
    src = build_source(tiny_cfg("data.source=stl10", f"data.path={tmp_path}", "data.batch_size=2"))
    assert src.image_size == 96 and src.num_classes == 10
    np.testing.assert_array_equal(np.asarray(src.train.images), ref["train"])
    np.testing.assert_array_equal(np.asarray(src.test.images), ref["test"])
    np.testing.assert_array_equal(src.train.labels, ref["train_y"])
    assert len(src.pretrain) == 6 + 5  # unlabeled + train
    np.testing.assert_array_equal(src.pretrain.images[2], ref["unlabeled"][2])
    np.testing.assert_array_equal(src.pretrain.images[7], ref["train"][1])
    assert len(src.folds) == 10
    for got, want in zip(src.folds, ref["folds"]):
        np.testing.assert_array_equal(got, want)


def test_stl10_wrong_length_is_refused(tmp_path, tiny_cfg):
    d = tmp_path / "stl10_binary"
    write_stl10(d)
    with open(d / "train_X.bin", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"train_X.bin: .* not a whole number of 3x96x96 images"):
        tiny_cfg("data.source=stl10", f"data.path={tmp_path}", "data.batch_size=2")
    write_stl10(d)
    np.zeros(3, np.uint8).tofile(d / "train_y.bin")
    with pytest.raises(ConfigError, match=r"train_y.bin: 3 labels for 5 images"):
        tiny_cfg("data.source=stl10", f"data.path={tmp_path}", "data.batch_size=2")


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickles_roundtrip(tmp_path, tiny_cfg, kind):
    from fastssl.data.sources import build_source

    d, ref = write_cifar(tmp_path, kind)
    src = build_source(tiny_cfg(f"data.source={kind}", f"data.path={tmp_path}", "data.batch_size=2"))
    train_names = [n for n in ref if "test" not in n]
    want_x = np.concatenate([ref[n][0] for n in train_names])
    np.testing.assert_array_equal(src.train.images, want_x)
    np.testing.assert_array_equal(src.train.labels, np.concatenate([ref[n][1] for n in train_names]))
    np.testing.assert_array_equal(src.test.images, ref[[n for n in ref if "test" in n][0]][0])
    assert src.num_classes == (10 if kind == "cifar10" else 100)


def test_cifar_wrong_shape_is_refused(tmp_path, tiny_cfg):
    import pickle

    d, _ = write_cifar(tmp_path, "cifar10")
    with open(os.path.join(d, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((7, 1000), np.uint8), b"labels": [0] * 7}, f)
    from fastssl.data import sources

    sources._CIFAR_CACHE.clear()
    with pytest.raises(ConfigError, match=r"data_batch_3: field b'data' has shape \(7, 1000\)"):
        tiny_cfg("data.source=cifar10", f"data.path={tmp_path}", "data.batch_size=2")


def test_folder_with_classes(tmp_path, tiny_cfg):
    from fastssl.data.sources import build_source

    files = write_folder(tmp_path / "imgs")
    src = build_source(
        tiny_cfg(
            "data.source=folder",
            f"data.path={tmp_path / 'imgs'}",
            "data.batch_size=2",
            "data.image_size=24",
            "method.patch_size=16",
        )
    )
    assert src.image_size == 24 and src.num_classes == 2
    assert sorted(src.train.files) == sorted(p for p, _ in files)
    assert list(src.train.labels) == [0, 0, 0, 1, 1, 1]


def test_folder_flat_is_unlabeled_and_empty_is_refused(tmp_path, tiny_cfg):
    from fastssl.data.sources import build_source

    write_folder(tmp_path / "imgs")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "imgs" / "cat").iterdir():
        os.rename(p, flat / p.name)
    src = build_source(
        tiny_cfg(
            "data.source=folder", f"data.path={flat}", "data.batch_size=2", "data.image_size=24", "method.patch_size=16"
        )
    )
    assert src.train.labels is None and len(src.pretrain) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^data.path: no .jpg/.jpeg/.png images found under .*empty"):
        tiny_cfg("data.source=folder", f"data.path={empty}", "data.batch_size=2")


def test_builtin_is_deterministic_and_balanced():
    from fastssl.data.sources import make_builtin

    a, ya = make_builtin(200, 32, 10, seed=3)
    b, yb = make_builtin(200, 32, 10, seed=3)
    c, _ = make_builtin(200, 32, 10, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert np.bincount(ya, minlength=10).min() >= 8
