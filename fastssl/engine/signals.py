"""SIGTERM / SIGUSR1 (SLURM pre-emption) -> finish the step, checkpoint, exit 0."""
from __future__ import annotations

import os
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


class FaultInjection:
    """Test hook: ``FASTSSL_KILL_AT_STEP=N`` makes the process SIGKILL itself right after step N
    (and after that step's checkpoint, if any), exactly as a crash would, at a known step."""

    def __init__(self):
        v = os.environ.get("FASTSSL_KILL_AT_STEP")
        self.kill_at = int(v) if v else None

    def after_step(self, step: int) -> None:
        if self.kill_at is not None and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
