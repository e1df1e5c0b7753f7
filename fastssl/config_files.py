"""The configs that ship with fastssl (``fastssl/configs/<method>/<name>.yaml``), found by name.

``--config`` takes a path or a shipped config's name: ``sc/stl10``, ``sc/stl10.yaml`` and
``configs/sc/stl10.yaml`` all name ``fastssl/configs/sc/stl10.yaml`` when no such file exists
where the command runs (a file that does exist is always read as it is).  So the same command
works from a checkout (where ``configs`` is a link to ``fastssl/configs``) and from an installed
wheel.  ``fastssl configs`` lists them with the first sentence of each file's header comment.

Imports nothing but the standard library (``fastssl.config`` uses it).
"""

from __future__ import annotations

import os

from fastssl.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def names() -> list:
    """Every shipped config's name, ``<method>/<name>``, sorted."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    out = []
    for method in sorted(os.listdir(CONFIG_DIR)):
        d = os.path.join(CONFIG_DIR, method)
        if os.path.isdir(d):
            out += [f"{method}/{f[:-5]}" for f in os.listdir(d) if f.endswith(".yaml")]
    return sorted(out)


def _short(name: str) -> str:
    """``configs/sc/stl10.yaml`` -> ``sc/stl10``."""
    n = str(name).replace(os.sep, "/").strip()
    for prefix in ("./", "fastssl/", "configs/"):
        if n.startswith(prefix):
            n = n[len(prefix) :]
    return n[: -len(".yaml")] if n.endswith(".yaml") else n


def shipped_path(name: str) -> str | None:
    """The file of the shipped config ``name`` (``sc/stl10``, ``sc/stl10.yaml``,
    ``configs/sc/stl10.yaml``), or None when fastssl ships no config of that name."""
    n = _short(name)
    if n.count("/") != 1 or ".." in n:
        return None
    path = os.path.join(CONFIG_DIR, *n.split("/")) + ".yaml"
    return path if os.path.isfile(path) else None


def find(name: str) -> str:
    """``--config``'s file: ``name`` itself when it is a file, else the shipped config it names;
    a ConfigError naming both places otherwise."""
    if os.path.isfile(name):
        return name
    path = shipped_path(name)
    if path is not None:
        return path
    if os.path.isdir(name):
        raise ConfigError(f"--config: {name} is a folder, not a YAML file")
    known = names()
    close = [k for k in known if k.split("/")[0] == _short(name).split("/")[0]]
    hint = f" ({', '.join(close)})" if close else f" ({len(known)} of them: fastssl configs lists them)"
    raise ConfigError(f"--config: file not found: {name}, and fastssl ships no config of that name{hint}")


def header(path: str, width: int = 110) -> str:
    """The first sentence of a config file's leading comment, on one line (cut at ``width``)."""
    lines = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if not text or (lines and text.startswith(("*", "-", "python ", "torchrun ", "fastssl "))):
                break
            lines.append(text)
    text = " ".join(lines)
    text = text[: _stops(text, (". ",))[0] + 1] if _stops(text, (". ",)) else text  # the first sentence
    if len(text) > width:  # the longest clause that fits
        fits = [i for i in _stops(text, ("; ", ": ", ", ")) if i <= width]
        text = text[: fits[-1]] if fits else text[: width - 3].rstrip() + "..."
    return text


def _stops(text: str, marks) -> list:
    """Positions in ``text`` where one of ``marks`` starts, outside parentheses."""
    out, depth = [], 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and any(text.startswith(m, i) for m in marks):
            out.append(i)
    return out


def listing() -> str:
    """``fastssl configs``: one line per shipped config, its name then its header."""
    ns = names()
    if not ns:
        return f"fastssl ships no configs here ({CONFIG_DIR} is missing)"
    w = max(map(len, ns))
    rows = [f"{n:{w}s}  {header(os.path.join(CONFIG_DIR, *n.split('/')) + '.yaml')}" for n in ns]
    return "\n".join(
        rows
        + [
            "",
            f"(in {CONFIG_DIR}; use one by name, e.g. fastssl train --config "
            f"{'sc/builtin' if 'sc/builtin' in ns else ns[0]} out_dir=runs/x, "
            "or copy it and pass the copy's path)",
        ]
    )
