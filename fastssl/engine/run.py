"""How a training run ends early: stopped by a signal (exit 0, continue with ``--resume``) or
aborted (exit 3) by non-finite losses or checkpoints that cannot be written, the last
checkpoint intact in both.  Each says why on the run's log, closes it and leaves the process
group; ``train.py`` returns the exit status they return."""

from __future__ import annotations

from fastssl import dist
from fastssl.engine.state import RunState

ABORTED = 3  # train.py's exit status when a run stops on a fault


def abort(log, msg: str) -> int:
    log.write(msg)
    log.close()
    dist.cleanup()
    return ABORTED


def abort_unsaved(log, step: int) -> int:
    """A checkpoint could not be written (``checkpoint.save`` said why)."""
    return abort(log, f"fastssl: stopping at step {step}: checkpoints cannot be written")


def abort_bad_steps(log, state: RunState, max_bad_steps: int, ck_path: str) -> int:
    """``train.max_bad_steps`` non-finite losses in a row."""
    return abort(
        log,
        f"fastssl: {state.bad_in_row} non-finite losses in a row (train.max_bad_steps="
        f"{max_bad_steps}): stopping at step {state.step}; the last checkpoint "
        f"{ck_path} is intact (lower optim.lr or set train.grad_clip)",
    )


def stopped(log, signal_name: str, step: int) -> int:
    """The signal's checkpoint is written (on every rank): exit 0, to be continued."""
    log.write(
        f"fastssl: {signal_name or 'stop on another rank'}: checkpoint written at step {step}; continue with --resume"
    )
    log.close()
    dist.barrier()
    dist.cleanup()
    return 0
