"""A machine where NVIDIA DALI cannot be used (not installed, or its native libraries fail to
load): ``data.pipeline=auto`` trains on the executor that needs only torch and says why in one
line; an explicit DALI pipeline stops before training with one line (exit 2)."""

import pytest
import torch

from conftest import blocked_imports, run, train_cmd
from fastssl.data import executors
from fastssl.data.dali_check import PipelineBuildError, check_gpu_graph
from fastssl.data.executors import choose_pipeline


@pytest.mark.slow
def test_auto_trains_on_the_tensor_executor_without_dali(tmp_path):
    out = tmp_path / "run"
    p = run(train_cmd(out, "train.max_steps=2"), env_extra=blocked_imports(tmp_path / "site", "nvidia.dali"))
    said = [line for line in p.stderr.splitlines() if "data.pipeline=auto" in line]
    assert len(said) == 1, p.stderr
    assert "dali-cpu is not usable here (ModuleNotFoundError: No module named 'nvidia.dali'" in said[0]
    assert said[0].endswith("training on tensor instead")
    assert "pipeline tensor" in p.stdout and (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_explicit_dali_pipeline_without_dali_stops_in_one_line(tmp_path):
    out = tmp_path / "run"
    p = run(
        train_cmd(out, "train.max_steps=2", "data.pipeline=dali-cpu"),
        check=False,
        env_extra=blocked_imports(tmp_path / "site", "nvidia.dali"),
    )
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == [
        "fastssl: data.pipeline=dali-cpu: NVIDIA DALI cannot be loaded (ModuleNotFoundError: No module named "
        "'nvidia.dali' (blocked by the test)); use data.pipeline=tensor (or auto, which falls back by itself), "
        "or install the DALI build for this machine (docs: Install)"
    ]
    assert not (out / "checkpoints" / "last.pt").exists()


class _Folder:
    encoded = True


@pytest.fixture
def cuda(monkeypatch):
    """This process as if it had a GPU (the choice only asks torch.cuda.is_available())."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    executors._say_once.cache_clear()


def test_auto_on_a_gpu_uses_dali_gpu_when_its_graph_builds(cuda):
    built = []
    assert choose_pipeline("auto", None, lambda: built.append(1)) == "dali-gpu" and built == [1]


@pytest.mark.parametrize("error", [ValueError("bad arg"), OSError("libnvjpeg.so.13: cannot open shared object")])
def test_auto_on_a_gpu_falls_back_when_the_graph_fails(cuda, caplog, capsys, error):
    def graph():
        def build():
            raise error

        check_gpu_graph(build, "the test graph")

    assert choose_pipeline("auto", _Folder(), graph) == "torch"
    assert choose_pipeline("auto", None, graph) == "tensor"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("data.pipeline=auto: dali-gpu is not usable here" in line for line in err)
    assert str(error).split(":")[0] in err[0] and err[0].endswith("training on torch instead")
    with pytest.raises(PipelineBuildError, match="the test graph cannot be built"):
        choose_pipeline("dali-gpu", None, graph)


def test_auto_says_why_once_per_process(cuda, capsys, monkeypatch):
    monkeypatch.setattr(executors, "dali_problem", lambda: "OSError: libcudart.so.13: cannot open shared object")
    assert [choose_pipeline("auto") for _ in range(3)] == ["tensor"] * 3
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "fastssl: data.pipeline=auto: dali-gpu is not usable here (OSError: libcudart.so.13: cannot open shared "
        "object); training on tensor instead"
    ]


def test_other_pipelines_are_taken_as_they_are():
    assert [choose_pipeline(p) for p in ("torch", "tensor")] == ["torch", "tensor"]
