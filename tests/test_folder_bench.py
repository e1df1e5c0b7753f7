"""The image-folder benchmark: its generated folder (real JPEGs of 300-500 px, deterministic,
reused) and a tiny run end to end (every CPU pipeline timed, the data check timed)."""

import json
import os

import pytest
from PIL import Image

from benchmarks.folder import make_folder
from conftest import PY, run


def test_make_folder_writes_valid_varied_jpegs_deterministically_and_reuses_them(tmp_path):
    files = make_folder(str(tmp_path / "a"), 24, seed=3, classes=4, progress=False)
    assert len(files) == 24 and all(os.path.isfile(f) for f in files)
    assert sorted(os.listdir(tmp_path / "a" / "train")) == ["class00", "class01", "class02", "class03"]
    sizes = set()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            im.load()  # decodes completely (a truncated file raises)
            assert im.mode == "RGB"
            w, h = im.size
        assert 300 <= w <= 500 and 300 <= h <= 500
        sizes.add((w, h))
    assert len(sizes) > 12  # sides drawn independently, not a fixed size
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert make_folder(str(tmp_path / "a"), 24, seed=3, classes=4, progress=False) == files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # reused, not rewritten
    again = make_folder(str(tmp_path / "b"), 6, seed=3, classes=4, progress=False)
    assert [open(f, "rb").read() for f in again] == [open(f, "rb").read() for f in files[:6]]
    other = make_folder(str(tmp_path / "c"), 6, seed=4, classes=4, progress=False)
    assert [open(f, "rb").read() for f in other] != [open(f, "rb").read() for f in again]
    os.remove(files[5])
    assert make_folder(str(tmp_path / "a"), 24, seed=3, classes=4, progress=False) == files
    assert open(files[5], "rb").read() == open(again[5], "rb").read()  # a missing file is written again


def test_make_folder_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "train" / "x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "x" / "mine.jpg")
    with pytest.raises(ValueError, match="did not write"):
        make_folder(str(tmp_path), 4, progress=False)


@pytest.mark.slow
def test_folder_benchmark_tiny(tmp_path):
    root, out = tmp_path / "folder", tmp_path / "out"
    make_folder(str(root), 64, seed=0, classes=10, progress=False)
    p = run(
        [PY, "-m", "benchmarks.folder", "--tiny", "--workers", "2", "--root", str(root), "--out", str(out)], timeout=300
    )
    assert "make_folder: reusing 64 images" in p.stdout
    res = json.loads((out / "folder.json").read_text())
    assert res["environment"]["torch"]
    pipe = {r["label"]: r for r in res["rows"] if r["kind"] == "pipeline"}
    assert {"torch DataLoader (PIL)", "dali-cpu"} <= set(pipe)
    import torch

    assert ("dali-gpu" in pipe) == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "dali-gpu: skipped (no CUDA GPU" in p.stdout
    assert pipe["torch DataLoader (PIL)"]["ratio_vs_dataloader"] == 1.0
    assert pipe["torch DataLoader (PIL)"]["reader_workers"] is None  # DALI's file readers only
    from benchmarks.folder import has_data_key

    if has_data_key("reader_workers"):  # the 'Python on the critical path' row
        assert pipe["dali-cpu reader_workers=0"]["reader_workers"] == 0
    for r in pipe.values():
        assert r["method"] == "invp" and r["image_size"] == 64 and r["workers"] == 2 and r["images"] == 64
        assert r["images_per_s"]["median"] > 0 and r["ratio_vs_dataloader"] > 0
    checks = {(r["step"], r["cache"]): r for r in res["rows"] if r["kind"] == "check"}
    assert {c for _, c in checks} == {"empty", "filled"} and len(checks) == 4
    for r in checks.values():
        assert r["seconds"] > 0 and r["images_per_s"] > 0 and r["images"] == 64
    md = (out / "folder.md").read_text()
    assert "| invp | dali-cpu | 2 |" in md and "| build_source | empty |" in md
    assert (out / "folder.png").stat().st_size > 1000
