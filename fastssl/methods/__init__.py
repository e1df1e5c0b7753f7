"""Method registry: one module per method, registered by name.

A method module defines a ``Method`` subclass (its loss, its pipeline recipe = which crops of
each image it wants, its config dataclass with defaults) and decorates it with ``@register``.
``train.py`` and ``eval`` only ever talk to the ``Method`` interface in ``base.py``.
"""
from __future__ import annotations

from typing import Dict, Type

_REGISTRY: Dict[str, Type] = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str):
    from fastssl.config import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available():
    return sorted(_REGISTRY)


# Importing a method module registers it.
from fastssl.methods import exemplar, invp, layerwise, sc, splitbrain  # noqa: E402,F401
