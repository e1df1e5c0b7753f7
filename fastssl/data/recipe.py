"""A method's data recipe: how its plan is drawn, which ops turn each planned view into pixels,
and the view size.  A method hands the data layer this object (``Method.recipe()``), never
itself; every executor runs the same recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from fastssl.data.ops.base import Op
from fastssl.data.plan import DrawFn


@dataclass
class Recipe:
    draw: Optional[DrawFn]  # (rng, n) -> {field: (n, views, ...)}, e.g. {"box": ..., "flip": ...}
    ops: Sequence[Op]  # applied in order to each view; the last may return several outputs
    views: int  # views per image
    size: int  # side of every view, pixels
    name: str = "recipe"
    # A recipe whose samples are not one per image draws its own epoch plan instead:
    # plan(seed, epoch, rank, world, batch_size) -> an object with ``steps`` and ``step(k)`` (a ViewPlan)
    plan: Optional[Callable] = None
    items: Optional[int] = None  # samples per epoch with ``plan`` (default: the split's images)

    def __post_init__(self):
        self.ops = list(self.ops)
        for op in self.ops[:-1]:
            if op.num_outputs != 1:
                raise ValueError(f"{self.name}: {op!r} returns {op.num_outputs} outputs and must be the last op")

    @property
    def reads(self) -> Tuple[str, ...]:
        """The plan fields the ops read, in op order (each once): the executors' inputs per view."""
        out: List[str] = []
        for op in self.ops:
            out += [f for f in op.reads if f not in out]
        return tuple(out)

    @property
    def outputs_per_view(self) -> int:
        return self.ops[-1].num_outputs if self.ops else 1

    def has(self, op_type) -> bool:
        return any(isinstance(op, op_type) for op in self.ops)

    def __str__(self) -> str:
        return f"{self.name}: {self.views} view(s) of {self.size}px, " + " -> ".join(map(repr, self.ops))
