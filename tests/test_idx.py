"""The ``idx`` source (MNIST, Fashion-MNIST, KMNIST, EMNIST): tiny files written here in the exact
IDX format (tests/formats.py), read back, and every malformed file refused in one line that names
the file and the field."""

import gzip
import os
import struct

import numpy as np
import pytest

from fastssl.config import ConfigError
from formats import write_idx


def cfg_for(tiny_cfg, path, *extra):
    return tiny_cfg("data.source=idx", f"data.path={path}", "data.batch_size=4", *extra)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_padded_to_32_and_grey_replicated(tmp_path, tiny_cfg, gz):
    from fastssl.data.sources import build_source

    ref = write_idx(tmp_path, gz=gz)
    src = build_source(cfg_for(tiny_cfg, tmp_path))
    assert src.name == "idx" and src.image_size == 32 and src.num_classes == 10
    for split in ("train", "test"):
        x, y = ref[split]
        got = getattr(src, split)
        assert got.images.shape == (len(x), 32, 32, 3) and got.images.dtype == np.uint8
        for c in range(3):  # the grey image in every channel, 2 px of zeros on each side
            np.testing.assert_array_equal(got.images[:, 2:30, 2:30, c], x)
        assert not got.images[:, :2].any() and not got.images[:, 30:].any() and not got.images[:, :, :2].any()
        np.testing.assert_array_equal(got.labels, y)
    np.testing.assert_array_equal(src.pretrain.images, src.train.images)  # pre-training sees the train images
    assert 0 < src.mean[0] < 1 and src.mean[0] == src.mean[2]


def test_idx_native_and_resized_sizes(tmp_path, tiny_cfg):
    from fastssl.data.sources import build_source

    ref = write_idx(tmp_path)
    native = build_source(cfg_for(tiny_cfg, tmp_path, "data.image_size=28"))
    np.testing.assert_array_equal(native.train.images[..., 1], ref["train"][0])
    small = build_source(cfg_for(tiny_cfg, tmp_path, "data.image_size=16", "method.patch_size=10"))
    assert small.image_size == 16 and small.train.images.shape[1:] == (16, 16, 3)
    with pytest.raises(ConfigError, match=r"data.image_size: must be >= 8, got 4"):
        cfg_for(tiny_cfg, tmp_path, "data.image_size=4")


def test_emnist_prefix_and_transpose(tmp_path, tiny_cfg):
    from fastssl.data.sources import build_source

    ref = write_idx(tmp_path, prefix="emnist-letters-", num_classes=27)
    src = build_source(cfg_for(tiny_cfg, tmp_path, "data.image_size=28"))
    np.testing.assert_array_equal(src.train.images[..., 0], ref["train"][0].transpose(0, 2, 1))
    assert src.num_classes == ref["train"][1].max() + 1  # labels 0..max of the train file
    write_idx(tmp_path, prefix="emnist-digits-")  # a second set in the same folder: which one?
    with pytest.raises(ConfigError, match=r"holds 2 IDX files ending in train-images-idx3-ubyte"):
        cfg_for(tiny_cfg, tmp_path)


def _rewrite(path, data: bytes):
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def _read(path) -> bytes:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return f.read()


BAD = {
    # name: (file to damage, damage(bytes) -> bytes, what the one-line message must say)
    "magic": (
        "train-images-idx3-ubyte",
        lambda b: struct.pack(">I", 0x802) + b[4:],
        r"magic 0x00000802, expected 0x00000803",
    ),
    "truncated": ("t10k-images-idx3-ubyte", lambda b: b[:-100], r"length \d+ bytes.*expected 4720"),
    "rows": ("t10k-images-idx3-ubyte", lambda b: b[:8] + struct.pack(">I", 0) + b[12:], r"header field rows = 0"),
    "counts": (
        "train-labels-idx1-ubyte",
        lambda b: struct.pack(">II", 0x801, 11) + b[8:-1],
        r"count = 11 labels, but .*train-images-idx3-ubyte.* holds 12 images",
    ),
    "label range": (
        "t10k-labels-idx1-ubyte",
        lambda b: b[:8] + bytes([12]) + b[9:],
        r"label 12 at index 0 is outside the train labels' range 0..9",
    ),
    "short header": ("train-labels-idx1-ubyte", lambda b: b[:6], r"truncated header \(6 of 8 bytes\)"),
}


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("kind", BAD)
def test_bad_idx_files_are_named_in_one_line(tmp_path, tiny_cfg, kind, gz):
    name, damage, message = BAD[kind]
    write_idx(tmp_path, gz=gz)
    path = str(tmp_path / (name + (".gz" if gz else "")))
    _rewrite(path, damage(_read(path)))
    with pytest.raises(ConfigError) as e:
        cfg_for(tiny_cfg, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.path: ") and path in msg
    assert __import__("re").search(message, msg), msg


def test_cut_gzip_and_mismatched_sizes_and_missing_files(tmp_path, tiny_cfg):
    write_idx(tmp_path)
    f = str(tmp_path / "train-images-idx3-ubyte.gz")
    raw = open(f, "rb").read()
    open(f, "wb").write(raw[: len(raw) // 2])  # a download cut short: the gzip trailer is gone
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte.gz: length \d+ bytes uncompressed .*truncated"):
        cfg_for(tiny_cfg, tmp_path)
    write_idx(tmp_path)
    test_x = tmp_path / "t10k-images-idx3-ubyte.gz"
    _rewrite(str(test_x), struct.pack(">IIII", 0x803, 6, 20, 20) + bytes(6 * 400))
    with pytest.raises(
        ConfigError, match=r"t10k-images-idx3-ubyte.gz: images of 20x20 px, but the train images are 28x28"
    ):
        cfg_for(tiny_cfg, tmp_path)
    os.remove(test_x)
    with pytest.raises(ConfigError, match=r"missing IDX file .*t10k-images-idx3-ubyte\[.gz\]"):
        cfg_for(tiny_cfg, tmp_path)


def test_data_check_reports_the_set(tmp_path, capsys):
    from fastssl.data.check import detect_source, main

    write_idx(tmp_path, n_train=30, n_test=10)
    assert detect_source(str(tmp_path)) == "idx"
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "idx: 30 pre-training, 30 train, 10 test images" in out
    assert "10 classes" in out and "28x28 px grey, replicated to RGB and zero-padded to 32 px" in out
    assert "train: " in out and "test: " in out
    _rewrite(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), struct.pack(">II", 0x801, 10) + bytes([99] * 10))
    assert main([str(tmp_path), "--source", "idx"]) == 2
    assert "label 99 at index 0" in capsys.readouterr().err


def test_a_short_run_trains_on_idx(tmp_path):
    """A real run on IDX files: the DALI CPU pipeline, the kNN monitor and its random-init level."""
    from conftest import read_metrics, run, train_cmd

    write_idx(tmp_path / "data", n_train=128, n_test=64)
    out = tmp_path / "run"
    run(train_cmd(out, "data.source=idx", f"data.path={tmp_path / 'data'}", "train.epochs=1", "train.monitor_bank=64"))
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and 0 <= rows[0]["knn_monitor_init"] <= 100
    assert any("knn_monitor" in r for r in rows[1:])
