"""python -m fastssl.doctor: every component checked against its reference, one row each, exit 1
only when something present fails (on this CPU machine: interpreted kernels, DALI CPU vs the
torch DataLoader, FAISS CPU vs torch, gloo)."""

import json
import os
import sys
import time

import pytest
import torch

from conftest import PY, ROOT, run

FAULT = "FASTSSL_FAULT_DOCTOR"

GROUP_IDS = {
    "kernel:sc_loss",
    "kernel:triplet",
    "kernel:bank_loss",
    "pipeline:sc",
    "pipeline:layerwise",
    "pipeline:invp",
    "pipeline:splitbrain",
    "pipeline:exemplar",
    "faiss",
    "faiss-gpu",
    "collectives",
}


def doctor(*args, env_extra=None, check=False, timeout=600):
    return run([PY, "-m", "fastssl.doctor", *args], check=check, env_extra=env_extra, timeout=timeout)


def rows_of(path):
    data = json.loads(path.read_text())
    return data, {r["id"]: r for r in data["components"]}


@pytest.mark.slow
def test_quick_json_every_component_on_cpu(tmp_path):
    p = doctor("--quick", "--jobs", "2", "--json", str(tmp_path / "d.json"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data, rows = rows_of(tmp_path / "d.json")
    assert GROUP_IDS <= set(rows) and not any(i.startswith("train:") for i in rows)  # --quick: no training
    assert data["complete"] and data["ok"] and data["versions"]["torch"] == torch.__version__
    for r in rows.values():
        assert r["status"] in ("ok", "not available"), r
    if not torch.cuda.is_available():
        assert rows["faiss-gpu"]["status"] == rows["pipeline:dali-gpu"]["status"] == "not available"
        assert rows["faiss-gpu"]["why"] == "no GPU"
        assert rows["kernel:sc_loss"]["component"].endswith("(interpreted)")
        assert "dali-cpu vs torch" in rows["pipeline:invp"]["detail"] and "tol" in rows["pipeline:invp"]["detail"]
        assert "tensor (cpu) vs torch: floats max|d| 0 " in rows["pipeline:invp"]["detail"]  # the same torch faces
        assert rows["collectives"]["detail"].startswith("gloo, world 2")
    assert "component" in p.stdout and "| status" in p.stdout and "available components work" in p.stdout
    assert "[ 1/" in p.stdout  # progress lines as it goes


@pytest.mark.slow
def test_a_failing_component_gives_exit_1_and_the_others_still_run(tmp_path):
    """The selfcheck's fault injection fails sc_loss; a crashing worker (FASTSSL_FAULT_DOCTOR) fails
    faiss; triplet still passes; one line of why each."""
    p = doctor(
        "--quick",
        "--only",
        "kernel:sc_loss,kernel:triplet,faiss",
        "--json",
        str(tmp_path / "d.json"),
        env_extra={"FASTSSL_FAULT_KERNEL": "sc_loss", "FASTSSL_FAULT_DOCTOR": "faiss"},
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    data, rows = rows_of(tmp_path / "d.json")
    assert set(rows) == {"kernel:sc_loss", "kernel:triplet", "faiss", "faiss-gpu"} and not data["ok"]
    assert rows["kernel:sc_loss"]["status"] == "failed" and "fault injected" in rows["kernel:sc_loss"]["why"]
    assert rows["faiss"]["status"] == "failed" and rows["faiss"]["why"].startswith("worker exited 3: fault injected")
    assert rows["kernel:triplet"]["status"] == "ok"
    assert all("\n" not in r["why"] for r in rows.values())
    assert "failed: float32: fault injected" in p.stdout and "2 of 4 components failed" in p.stdout


@pytest.mark.slow
def test_training_row_and_unknown_names(tmp_path):
    p = doctor("--only", "train:layerwise", "--json", str(tmp_path / "d.json"))
    assert p.returncode == 0, p.stdout[-3000:]
    _, rows = rows_of(tmp_path / "d.json")
    assert list(rows) == ["train:layerwise"] and rows["train:layerwise"]["status"] == "ok"
    assert rows["train:layerwise"]["detail"].startswith("2 steps, " + ("bf16" if torch.cuda.is_available() else "fp32"))
    bad = doctor("--only", "kernal")
    assert bad.returncode == 2 and "unknown component 'kernal'" in bad.stderr


@pytest.mark.slow
def test_the_method_rows_come_from_the_registry(tmp_path):
    """The per-method rows are the registry's, listed in a worker: when that worker crashes, one
    failed row says so (and the doctor still finishes)."""
    p = doctor("--list", "--only", "pipeline,train")
    ids = [line.split()[0] for line in p.stdout.splitlines() if line.startswith(("pipeline:", "train:"))]
    from fastssl.methods import for_tools

    assert ids == [f"pipeline:{m}" for m in for_tools()] + ["pipeline:dali-gpu"] * (not torch.cuda.is_available()) + [
        f"train:{m}" for m in for_tools()
    ]
    assert for_tools() == ["sc", "layerwise", "invp", "splitbrain", "exemplar"]  # (the five's order, as before)
    p = doctor("--quick", "--only", "pipeline:sc", "--json", str(tmp_path / "d.json"), env_extra={FAULT: "methods"})
    assert p.returncode == 1
    _, rows = rows_of(tmp_path / "d.json")
    assert list(rows) == ["methods"] and rows["methods"]["status"] == "failed"
    assert rows["methods"]["why"].startswith("cannot list the methods (fastssl.methods): worker exited 3")


def test_time_limit_kills_the_command_and_its_children(tmp_path):
    sys.path.insert(0, ROOT)
    from fastssl import doctor as d

    pid_file = tmp_path / "pid"
    child = f"import os,time; open({str(pid_file)!r},'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"import subprocess,sys; subprocess.run([sys.executable,'-c',{child!r}])"
    t = time.perf_counter()
    rc, _, _ = d.run_cmd([sys.executable, "-c", parent], 3)
    assert rc is None and time.perf_counter() - t < 20
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with its process group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} outlived the time limit")
    assert d._selected("faiss-gpu", ["faiss"]) and not d._selected("faiss", ["faiss-gpu"])
    assert d._selected("pipeline:sc", ["pipelines"]) and not d._selected("pipeline:sc", ["pipeline:invp"])
