"""Method registry: one module (or package) per method, registered by name.

A method module (or a package's ``__init__``, when the method has data code of its own, as
``exemplar/`` and ``splitbrain/`` do) defines a ``Method`` subclass (its loss, its pipeline recipe = which crops of
each image it wants, its config dataclass with defaults) and decorates it with ``@register``;
every module of this folder is imported here, so a new file is all a new method needs.
``train.py``, ``eval`` and the tools (doctor, benchmarks, report, export) only ever talk to the
``Method`` interface in ``base.py``: what a tool needs of a method, the method declares there.
"""

from __future__ import annotations

from typing import List, Optional

from fastssl.registry import Registry

METHODS = Registry("method", "method.name")


def register(cls):
    """Class decorator: registers a ``Method`` subclass under its ``name``."""
    return METHODS.register(cls.name)(cls)


def get_method(name: str):
    return METHODS.get(name)


def available():
    return sorted(METHODS.names())


def for_tools(benchmark: Optional[str] = None) -> List[str]:
    """The methods the tools list (doctor rows, benchmark rows), in their ``tool_order`` (ties by
    name); with ``benchmark``, those whose ``benchmarks`` declare it (e.g. "train_step")."""
    classes = [METHODS.get(n) for n in METHODS.names()]
    chosen = [c for c in classes if benchmark is None or benchmark in c.benchmarks]
    return [c.name for c in sorted(chosen, key=lambda c: (c.tool_order, c.name))]


def _import_all() -> None:
    """Import every module and package of this folder (base excepted): importing a method module registers it,
    so adding a method is adding its file (docs/adding-a-method.md)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
