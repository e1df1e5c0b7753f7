"""fastssl's exceptions and its one validation idiom; this module imports nothing of fastssl, so
any module can raise them.

A setting is checked with ``check(condition, key, message)`` (a one-line ``ConfigError`` naming
the key) and a choice among fixed words with ``choice(value, key, options)``.  A choice known
when the schema is written is a ``Literal`` field (OmegaConf refuses any other value on merge,
and ``fastssl.config`` words the refusal as ``choice`` does); ``choice`` is for the choices a
registry knows only at run time (data sources, architectures).  Check a setting only where it
is used: a setting of a feature that is off is not read, so it is not refused.
"""

from typing import Iterable


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def check(condition, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def choice(value, key: str, options: Iterable) -> None:
    """``value`` must be one of ``options``: ``<key>: 'x' is not one of a, b, c`` otherwise."""
    options = tuple(options)
    check(value in options, key, f"{value!r} is not one of {', '.join(map(str, options))}")
