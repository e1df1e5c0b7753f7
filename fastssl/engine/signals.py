"""SIGTERM / SIGUSR1 (SLURM pre-emption) -> finish the step, checkpoint, exit 0."""
from __future__ import annotations

import signal


class StopRequest:
    """Installs handlers that only set a flag; the training loop polls ``requested``."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._old = {}
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
