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
    train = _module("fastssl.train", "train")
    if nproc is None or any(a in ("-h", "--help") for a in rest):
        return train.main(rest)
    from fastssl.errors import ConfigError

    world = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(nproc)  # (what the ranks will see: e.g. the batch against the images)
    try:  # the config is checked here, once: a mistake is one line and exit 2, as in one process
        train.resolve_config(train.parse_args(rest))
    except ConfigError as e:
        print(f"fastssl: config error: {e}", file=sys.stderr)
        return 2
    finally:
        if world is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = world
    return run_torchrun(torchrun_argv(nproc, rest))


def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (torchrun's workers), from /proc."""
    out = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d))
    return out


def run_torchrun(cmd: list) -> int:
    """Run torchrun in its own session and hand it no terminal signal: Ctrl-C, SIGTERM and SIGUSR1
    go straight to its workers, which finish their step, write a checkpoint and exit 0 (one line,
    as a single process does), so torchrun ends normally instead of tearing them down with a
    traceback.  Returns torchrun's exit status."""
    import signal
    import subprocess

    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, frame):
        workers = _children(proc.pid)
        for pid in workers or [proc.pid]:  # (no workers yet: torchrun itself stops)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    old = {s: signal.signal(s, forward) for s in handled}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _configs(argv):
    import argparse

    from fastssl import config_files

    p = argparse.ArgumentParser(
        prog="fastssl configs",
        description="List the configs that ship with fastssl, or print one (to copy and edit).",
    )
    p.add_argument("name", nargs="?", help="a config's name, e.g. sc/builtin: print its file")
    a = p.parse_args(argv)
    if a.name is None:
        print(config_files.listing())
        return 0
    path = config_files.shipped_path(a.name)
    if path is None:
        raise CommandError(f"configs: no shipped config is named {a.name!r} (fastssl configs lists them)")
    with open(path) as f:
        sys.stdout.write(f.read())
    return 0


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
        "fastssl train --config sc/builtin train.epochs=1 out_dir=runs/x   (or: fastssl train --nproc 2 --config ...)",
        _train,
        "  --nproc N   run under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=N "
        "fastssl/train.py ...\n              (the config is checked first; Ctrl-C stops every rank after its step, "
        "with a checkpoint)",
    ),
    "configs": Command(
        "list the configs that ship with fastssl (use one by name: --config sc/builtin), or print one",
        "fastssl configs   (fastssl configs sc/builtin > my.yaml: a copy to edit)",
        _configs,
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


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name in ("--version", "-V"):
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


def main(argv: list[str] | None = None) -> int:
    """The ``fastssl`` command; its output piped into a reader that stops early (``| head``) ends
    quietly: exit 0 for help and listings, 141 (as a process killed by SIGPIPE) for a tool's run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rc = _main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python's own flush at exit would fail again)
        quiet = not argv or argv[0] in ("-h", "--help", "help", "configs") or any(a in ("-h", "--help") for a in argv)
        return 0 if quiet else 141


if __name__ == "__main__":
    sys.exit(main())
