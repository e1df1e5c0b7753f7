"""fastssl's messages, through ``logging``: one ``fastssl`` logger writing each message as it is
written (it names its source, e.g. ``fastssl: data check: ...``) to standard error, and under
torchrun only rank 0's, so that N processes do not print every line N times.  A message every
rank must give (one rank waiting for another) passes ``extra={"every_rank": True}``.

The training log (``engine/metrics.py``: the step lines and ``metrics.jsonl``) is not a message:
it stays on standard output, on rank 0.
"""

from __future__ import annotations

import logging
import os
import sys


class RankZeroFilter(logging.Filter):
    """Lets a record through on rank 0 (``RANK``, set by torchrun), or on any rank when it is marked
    ``every_rank``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or os.environ.get("RANK", "0") == "0"


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (pytest and tools swap it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # (StreamHandler's __init__ assigns it)
        pass


def get_logger(name: str = "fastssl") -> logging.Logger:
    """The ``fastssl`` logger (or a child, e.g. ``fastssl.knn``), set up on first use: INFO and up,
    plain messages, rank 0 only; not propagated to the root logger (no second copy of each line)."""
    root = logging.getLogger("fastssl")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)
