"""Method registry: one module per method, registered by name.

A method module defines a ``Method`` subclass (its loss, its pipeline recipe = which crops of
each image it wants, its config dataclass with defaults) and decorates it with ``@register``;
every module of this folder is imported here, so a new file is all a new method needs.
``train.py`` and ``eval`` only ever talk to the ``Method`` interface in ``base.py``.
"""

from __future__ import annotations

from fastssl.registry import Registry

METHODS = Registry("method", "method.name")


def register(cls):
    """Class decorator: registers a ``Method`` subclass under its ``name``."""
    return METHODS.register(cls.name)(cls)


def get_method(name: str):
    return METHODS.get(name)


def available():
    return sorted(METHODS.names())


def _import_all() -> None:
    """Import every module of this folder (base excepted): importing a method module registers it,
    so adding a method is adding its file (docs/adding-a-method.md)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
