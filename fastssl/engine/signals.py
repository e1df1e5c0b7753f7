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
    """Test hooks that make faults happen at known steps, through the real code paths:

    * ``FASTSSL_KILL_AT_STEP=N``: SIGKILL itself right after step N (and after that step's
      checkpoint, if any), exactly as a crash would;
    * ``FASTSSL_NAN_AT_STEPS=3,4``: the loss of these steps becomes NaN;
    * ``FASTSSL_FAIL_CKPT_AT_STEP=N``: the checkpoint written at step N fails half way with
      ENOSPC (a full disk), after some bytes reached the temporary file.
    """

    def __init__(self):
        v = os.environ.get("FASTSSL_KILL_AT_STEP")
        self.kill_at = int(v) if v else None
        self.nan_at = {int(s) for s in os.environ.get("FASTSSL_NAN_AT_STEPS", "").split(",") if s.strip()}
        v = os.environ.get("FASTSSL_FAIL_CKPT_AT_STEP")
        self.fail_ckpt_at = int(v) if v else None

    def after_step(self, step: int) -> None:
        if self.kill_at is not None and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, step: int, loss):
        """The loss of (1-based) ``step``, poisoned when asked."""
        return loss * float("nan") if step in self.nan_at else loss

    def ckpt_fails(self, step: int) -> bool:
        return self.fail_ckpt_at is not None and step == self.fail_ckpt_at
