"""Pre-emptible evaluation: the protocols repeat runs (seeds); each finished run is recorded in
``<out>.partial.json`` at once, a SIGTERM/SIGUSR1 stops the current run within one epoch, and
``--resume`` skips the runs already recorded (each run is seeded, so the result is the same as
an uninterrupted evaluation's)."""

from __future__ import annotations

import json
import os


class Preempted(Exception):
    """Raised inside a protocol when a stop signal arrived; the finished runs are on disk."""


class Ledger:
    def __init__(self, path=None, stop=None, resume: bool = False):
        self.path, self.stop = path, stop
        self.runs = {}
        if path and resume and os.path.isfile(path):
            with open(path) as f:
                self.runs = {int(k): v for k, v in json.load(f)["runs"].items()}

    def has(self, k: int) -> bool:
        return k in self.runs

    def get(self, k: int):
        return self.runs[k]

    def add(self, k: int, result) -> None:
        if self.path is None:  # NO_LEDGER (shared by every call): records nothing
            return
        self.runs[k] = result
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"runs": self.runs}, f)
        os.replace(tmp, self.path)

    def check(self) -> None:
        if self.stop is not None and self.stop.requested:
            raise Preempted(self.stop.name)

    def discard(self) -> None:
        if self.path and os.path.isfile(self.path):
            os.unlink(self.path)


NO_LEDGER = Ledger()
