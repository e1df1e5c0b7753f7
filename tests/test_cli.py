"""The ``fastssl`` command (fastssl/cli.py): every sub-command's --help, one real invocation
of each at tiny sizes (as ``python -m fastssl ...``), and the installed console script."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from conftest import PY, ROOT, TINY, run

FASTSSL = [PY, "-m", "fastssl"]
SCRIPT = os.path.join(os.path.dirname(PY), "fastssl")
# an option each tool's own --help lists (so the tool's options are shown, not only ours)
TOOL_OPTION = {
    "train": "--resume",
    "eval": "--protocol",
    "export": "--format",
    "check": "--no-cache",
    "report": "--gallery",
    "bench": "--suites",
    "doctor": "--quick",
}


def _one_line(text):
    text = text.strip()
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("name", list(TOOL_OPTION))
def test_help_shows_example_and_tool_options(name, capsys):
    from fastssl import cli

    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert cli.COMMANDS[name].example in out
    module_present = name not in ("report", "doctor") or importlib.util.find_spec(f"fastssl.{name}") is not None
    if module_present:
        assert TOOL_OPTION[name] in out


def test_usage_and_unknown_command():
    p = run(FASTSSL, check=False)
    assert p.returncode == 2 and "usage: fastssl <command>" in p.stderr
    for name in TOOL_OPTION:
        assert f"  {name} " in p.stderr
    p = run(FASTSSL + ["nosuch"], check=False)
    assert p.returncode == 2 and "unknown command 'nosuch'" in p.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    run(
        FASTSSL
        + [
            "train",
            "--config",
            "configs/sc/builtin.yaml",
            *TINY,
            "train.max_steps=2",
            "data.pipeline=torch",
            "train.tensorboard=false",
            f"out_dir={out}",
        ]
    )
    return out


@pytest.mark.slow
def test_train_eval_export(run_dir):
    ck = run_dir / "checkpoints" / "last.pt"
    assert ck.is_file() and (run_dir / "metrics.jsonl").is_file()

    p = run(FASTSSL + ["eval", "--checkpoint", str(ck), "--protocol", "knn"])
    assert "knn accuracy" in p.stdout
    res = json.loads((run_dir / "eval_knn.json").read_text())
    assert res["protocol"] == "knn" and 0 <= res["accuracy"] <= 100

    out = run_dir / "backbone.pt"
    p = run(FASTSSL + ["export", "--checkpoint", str(ck), "--format", "state_dict", "--out", str(out)])
    assert "fastssl.models.build" in p.stdout
    exported = torch.load(out, weights_only=True)
    assert exported["meta"]["arch"] == "convnet" and exported["meta"]["step"] == 2


@pytest.mark.slow
def test_report(run_dir):
    p = run(FASTSSL + ["report", str(run_dir)], check=False)
    if importlib.util.find_spec("fastssl.report") is None:
        assert p.returncode == 2 and "report" in _one_line(p.stderr)
        return
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run_dir / "report.md").is_file()


@pytest.mark.slow
def test_doctor():
    p = run(FASTSSL + ["doctor", "--quick", "--only", "faiss"], check=False)  # (all of --quick: ~1 min on 2 cores)
    if importlib.util.find_spec("fastssl.doctor") is None:
        assert p.returncode == 2 and "doctor" in _one_line(p.stderr)
        return
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "faiss" in p.stdout


def test_missing_tool_is_one_line(monkeypatch, capsys):
    from fastssl import cli

    c = cli.COMMANDS["report"]
    monkeypatch.setitem(
        cli.COMMANDS, "report", c._replace(run=lambda argv: cli._module("fastssl.no_such_report", "report").main(argv))
    )
    assert cli.main(["report", "runs/x"]) == 2
    assert "fastssl/no_such_report.py is missing" in _one_line(capsys.readouterr().err)


def test_check_folder(tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / f"ok{i}.png")
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    p = run(
        FASTSSL + ["check", str(data), "--source", "folder"],
        check=False,
        env_extra={"FASTSSL_CACHE": str(tmp_path / "cache")},
    )
    assert p.returncode == 1, p.stderr  # some files are bad
    assert "2 usable images" in p.stdout and "broken.jpg" in p.stdout


def test_bench_passes_arguments_through(monkeypatch, capsys):
    from fastssl import cli

    with pytest.raises(SystemExit) as e:  # benchmarks' own argparse saw the argument
        cli.main(["bench", "--suites", "nosuch"])
    assert e.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "CHECKOUT", "/nonexistent/site-packages")  # an installed package, no checkout
    assert cli.main(["bench", "--tiny"]) == 2
    assert "needs a fastssl checkout" in _one_line(capsys.readouterr().err)


@pytest.mark.ddp
def test_train_nproc_runs_torchrun(capsys):
    from fastssl import cli

    assert cli.split_nproc(["--config", "c.yaml", "--nproc", "2", "out_dir=x"]) == (
        2,
        ["--config", "c.yaml", "out_dir=x"],
    )
    assert cli.split_nproc(["--nproc=4", "--resume"]) == (4, ["--resume"])
    assert cli.split_nproc(["--config", "c.yaml"]) == (None, ["--config", "c.yaml"])
    argv = cli.torchrun_argv(2, ["--config", "c.yaml"])
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5] == os.path.join(ROOT, "fastssl", "train.py") and os.path.isfile(argv[5])
    assert argv[6:] == ["--config", "c.yaml"]
    for bad in (["--nproc", "0"], ["--nproc", "two"], ["--nproc"]):
        assert cli.main(["train", *bad]) == 2
        assert "--nproc" in _one_line(capsys.readouterr().err)


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="the console script is not installed (pip install -e .)")
def test_console_script(tmp_path):
    p = run([SCRIPT, "--help"])
    assert "usage: fastssl <command>" in p.stdout
    p = run([SCRIPT, "export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b.pt")], check=False)
    assert p.returncode == 2 and "no such file" in _one_line(p.stderr)
