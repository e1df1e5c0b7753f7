"""Registries by name: the one place a new method, backbone, data source or evaluation protocol
is added (a decorator on its definition), and the choice lists of the config's fixed settings.

This module imports nothing of fastssl but ``fastssl.errors``, so the config, the data layer and
the methods can all use it without importing each other.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Literal, Tuple, get_args

from fastssl.errors import ConfigError

# the config's fixed choices (the open-ended ones are registries below, filled where defined)
# (a ``Literal`` type is the config field's type, OmegaConf checks it on merge; the tuple lists it)
Pipeline = Literal["auto", "dali-gpu", "dali-cpu", "torch", "tensor", "synthetic"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PIPELINES = get_args(Pipeline)
PRECISIONS = get_args(Precision)


class Registry:
    """Named entries of one kind, added by decorator::

        BACKBONES = Registry("backbone", "model.arch")

        @BACKBONES.register("convnet", stages=("block1", "block2", "block3"))
        def convnet(model_cfg, image_size): ...

    ``get`` raises ``ConfigError`` naming the config key and the registered names; ``meta`` holds
    the keyword arguments given at registration (e.g. a backbone's stage names).
    """

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: Dict[str, Any] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str, **meta) -> Callable:
        def add(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name], self._meta[name] = obj, meta
            return obj

        return add

    def get(self, name: str):
        if name not in self._entries:
            raise ConfigError(
                f"{self.key}: unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def meta(self, name: str) -> Dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> Tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
