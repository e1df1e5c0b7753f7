"""``fastssl``: one command for every fastssl tool (also ``python -m fastssl``).

    fastssl <command> [arguments ...]       fastssl <command> --help

Each command hands its arguments, unchanged, to the tool it names (the same function the
tool's own entry point runs), so ``fastssl train ...`` is ``fastssl/train.py ...`` and
``fastssl eval ...`` is ``python -m fastssl.eval ...``.  Tools are imported only when their
command runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(PKG_DIR)  # the folder holding the fastssl package (a checkout's root)
TRAIN_SCRIPT = os.path.join(PKG_DIR, "train.py")


class CommandError(Exception):
    """A one-line reason a command cannot run (exit status 2)."""


class Command(NamedTuple):
    summary: str
    example: str
    run: Callable[[list[str]], int | None]
    extra_help: str = ""


# ---------------------------------------------------------------- the tools


def _module(name: str, what: str):
    """Import ``name`` lazily; a missing module (or a missing dependency of it) is one line."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise CommandError(
                f"{what}: not available in this installation ({name.replace('.', '/')}.py is missing)"
            ) from None
        raise CommandError(f"{what}: needs the Python package {e.name!r}, which is not installed") from None


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command ``fastssl train --nproc N ...`` runs: torchrun on fastssl/train.py."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        TRAIN_SCRIPT,
        *args,
    ]


def split_nproc(argv: list[str]):
    """(N or None, the other arguments) from ``--nproc N`` / ``--nproc=N`` anywhere in argv."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc":
            if i + 1 >= len(argv):
                raise CommandError("train: --nproc needs a number of processes, e.g. --nproc 2")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if value is None:
        return None, rest
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise CommandError(f"train: --nproc must be a whole number >= 1, got {value!r}")
    return n, rest


def _train(argv):
    nproc, rest = split_nproc(argv)
    if nproc is None or any(a in ("-h", "--help") for a in rest):
        return _module("fastssl.train", "train").main(rest)
    cmd = torchrun_argv(nproc, rest)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":  # become torchrun: signals (SLURM's SIGUSR1/SIGTERM) reach it exactly as before
        os.execv(cmd[0], cmd)
    import subprocess

    return subprocess.call(cmd)


def _eval(argv):
    return _module("fastssl.eval.__main__", "eval").main(argv)


def _export(argv):
    return _module("fastssl.export", "export").main(argv)


def _check(argv):
    return _module("fastssl.data.check", "check").main(argv)


def _report(argv):
    return _module("fastssl.report", "report").main(argv)


def _doctor(argv):
    return _module("fastssl.doctor", "doctor").main(argv)


def _bench(argv):
    if not os.path.isfile(os.path.join(CHECKOUT, "benchmarks", "__main__.py")):
        raise CommandError(
            f"bench: needs a fastssl checkout (a git clone): there is no benchmarks/ folder beside "
            f"the fastssl package in {CHECKOUT}"
        )
    if CHECKOUT not in sys.path:
        sys.path.insert(0, CHECKOUT)
    mod = importlib.import_module("benchmarks.__main__")
    if not os.path.abspath(mod.__file__).startswith(os.path.join(CHECKOUT, "benchmarks")):
        raise CommandError(f"bench: another 'benchmarks' package ({mod.__file__}) shadows the checkout's")
    return mod.main(argv)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "pre-train a method (fastssl/train.py); --nproc N runs it under torchrun with N processes",
        "fastssl train --config configs/sc/builtin.yaml train.epochs=1 out_dir=runs/x   "
        "(or: fastssl train --nproc 2 --config ...)",
        _train,
        "  --nproc N   run under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=N "
        "fastssl/train.py ...\n              (torchrun fastssl/train.py ... works as before)",
    ),
    "eval": Command(
        "evaluate a checkpoint's backbone: linear, knn, finetune, transfer, svm-folds (python -m fastssl.eval)",
        "fastssl eval --checkpoint runs/x/checkpoints/last.pt --protocol knn",
        _eval,
    ),
    "export": Command(
        "write a checkpoint's backbone for torchvision, timm or as a plain state dict (python -m fastssl.export)",
        "fastssl export --checkpoint runs/x/checkpoints/last.pt --format torchvision --out backbone.pt",
        _export,
    ),
    "check": Command(
        "validate a dataset's files before training (python -m fastssl.data.check)",
        "fastssl check data/my_images --source folder",
        _check,
    ),
    "report": Command(
        "write RUN_DIR/report.md with training curves, neighbours and filters (python -m fastssl.report)",
        "fastssl report runs/x",
        _report,
    ),
    "bench": Command(
        "run the benchmark suites of a checkout (python -m benchmarks)", "fastssl bench --tiny --suites knn", _bench
    ),
    "doctor": Command(
        "check this machine: versions, then every component on tiny inputs (python -m fastssl.doctor)",
        "fastssl doctor --quick",
        _doctor,
    ),
}


def usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: fastssl <command> [arguments ...]   (fastssl <command> --help for its options)", "", "commands:"]
    lines += [f"  {n:{w}s}  {c.summary}" for n, c in COMMANDS.items()]
    lines += ["", "examples:"] + [f"  {c.example}" for c in COMMANDS.values()]
    return "\n".join(lines)


def _epilog(name: str, c: Command) -> str:
    return f"\nexample ({'fastssl ' + name}):\n  {c.example}\n" + (
        f"\nfastssl {name} also takes:\n{c.extra_help}\n" if c.extra_help else ""
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name == "--version":
        from fastssl import __version__

        print(f"fastssl {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"fastssl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    wants_help = any(a in ("-h", "--help") for a in rest)
    old_argv0 = sys.argv[0]
    sys.argv[0] = f"fastssl {name}"  # the tools' argparse shows this as their program name
    try:
        if wants_help:
            print(f"fastssl {name}: {cmd.summary}\n", flush=True)
        rc = cmd.run(rest)
    except CommandError as e:
        print(f"fastssl {e}", file=sys.stderr)
        if wants_help:  # the example is still shown; the help itself succeeded
            print(_epilog(name, cmd), flush=True)
            return 0
        return 2
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        if wants_help and e.code in (0, None):
            print(_epilog(name, cmd), flush=True)
            return 0
        raise
    finally:
        sys.argv[0] = old_argv0
    if wants_help:  # a tool whose --help returned instead of exiting
        print(_epilog(name, cmd), flush=True)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
