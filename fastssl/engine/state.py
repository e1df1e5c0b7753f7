"""Where a run is: the training loop's position as one object, and the arithmetic over it.

A run trains ``stages`` stages (most methods one; layer-wise one per layer, Exemplar-CNN a
retraining after the clustering) of ``epochs`` epochs of ``steps_per_epoch`` steps each, at
most ``max_steps`` steps in all.  ``RunState`` is the position in that plan (stage, epoch,
step within the epoch, global step) and the non-finite-loss count; ``to_dict`` / ``from_dict``
are its fields in a checkpoint (``stage``, ``epoch``, ``step_in_epoch``, ``step``,
``skipped_steps``: the keys every checkpoint has had, so any ``last.pt`` resumes).

A checkpoint stores the position a resumed run starts from, not the one it was written at:
after the last step of an epoch that is the start of the next epoch (``restart_point``), and
after the last epoch of a stage the start of the next stage (``next_stage_start``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional


@dataclass(frozen=True)
class Schedule:
    """The plan: ``stages`` x ``epochs`` x ``steps_per_epoch`` steps, cut at ``max_steps``."""

    stages: int
    epochs: int  # per stage
    steps_per_epoch: int
    max_steps: Optional[int] = None

    @property
    def total_steps(self) -> int:
        n = self.stages * self.epochs * self.steps_per_epoch
        return n if self.max_steps is None else min(n, self.max_steps)


@dataclass
class RunState:
    stage: int = 0
    epoch: int = 0  # within the stage
    step_in_epoch: int = 0  # steps of this epoch already taken (the next one's index)
    step: int = 0  # steps taken in all (over every stage)
    skipped: int = 0  # steps whose loss was not finite (no update), in all
    bad_in_row: int = 0  # the latest of those in a row (not saved: a resumed run counts afresh)

    # ---- checkpoint round trip

    def to_dict(self) -> Dict[str, int]:
        """The checkpoint's position fields."""
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "skipped_steps": self.skipped,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunState":
        """The position a checkpoint holds; ``stage`` and ``skipped_steps`` are absent from
        those written before there were stages and non-finite-step counts."""
        return cls(
            stage=d.get("stage", 0),
            epoch=d["epoch"],
            step_in_epoch=d["step_in_epoch"],
            step=d["step"],
            skipped=d.get("skipped_steps", 0),
        )

    # ---- the loop's arithmetic

    def done(self, plan: Schedule) -> bool:
        """Every planned step is taken."""
        return self.step >= plan.total_steps

    def epoch_done(self, plan: Schedule) -> bool:
        return self.step_in_epoch >= plan.steps_per_epoch

    def stage_done(self, plan: Schedule) -> bool:
        return self.epoch >= plan.epochs

    def advance(self, bad: Optional[bool] = None) -> None:
        """One step taken; ``bad``: its loss was not finite, so it was skipped (no update).  The
        training loop learns that a step late and counts it then (``count_skipped``)."""
        self.step += 1
        self.step_in_epoch += 1
        if bad is not None:
            self.count_skipped(bad)

    def count_skipped(self, bad: bool) -> None:
        """Count a step taken earlier: skipped (``bad``) or not; steps are counted in order."""
        if bad:
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        else:
            self.bad_in_row = 0

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def roll_over(self, plan: Schedule) -> None:
        """At an epoch's end, move to the start of the next epoch (of the same stage)."""
        if self.epoch_done(plan):
            self.next_epoch()

    def next_stage(self) -> None:
        self.stage, self.epoch, self.step_in_epoch = self.stage + 1, 0, 0

    def progress(self, plan: Schedule) -> float:
        """Epochs of this stage done, fractional (the ``epoch`` of a metrics record)."""
        return self.epoch + self.step_in_epoch / plan.steps_per_epoch

    # ---- where a resumed run starts

    def restart_point(self, plan: Schedule) -> "RunState":
        """The position a checkpoint written now holds: this one, or the next epoch's start
        after an epoch's last step."""
        pos = dataclasses.replace(self)
        pos.roll_over(plan)
        return pos

    def next_stage_start(self) -> "RunState":
        """The position a checkpoint written at the end of a stage holds: the next stage's start."""
        pos = dataclasses.replace(self)
        pos.next_stage()
        return pos


def stage_fields(num_stages: int, stage: int) -> Dict[str, int]:
    """The ``stage`` field of a metrics record: every record of a multi-stage method carries its
    stage (0-based); a one-stage method's records have none."""
    return {"stage": stage} if num_stages > 1 else {}
