"""The op contract: one augmentation = one class with a DALI face and a torch face.

An op reads the plan fields it names in ``reads`` (for one view: arrays of shape (batch, ...)).

* ``dali(x, f, ctx)``: ``x`` is the view's DALI node (HWC), ``f`` maps each field in ``reads``
  to a DALI node (one sample per image, on the CPU: DALI wants named-argument inputs there);
  returns the new node.
* ``torch(x, f, ctx)``: ``x`` is the view of the whole batch, a (B, C, H, W) tensor (or, only
  between a crop of boxes of different sizes and the resize, a list of (C, h, w) tensors);
  ``f`` maps each field to a CPU tensor (B, ...); returns the new batch (on ``x``'s device).

Both faces compute the same maths; ``tests/test_ops.py`` checks every op's DALI face against its
torch face on the same plan.  An op whose ``num_outputs`` is above 1 ends a recipe: it returns a
list (e.g. the Split-Brain network input and its two target maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class ViewContext:
    """What ops need beyond the plan: the view side, the source's normalisation, the backend."""

    size: int  # side of the recipe's views (pixels)
    mean: Sequence[float] = (0.5, 0.5, 0.5)  # per channel, on [0, 1] pixels
    std: Sequence[float] = (0.25, 0.25, 0.25)
    device: str = "cpu"  # DALI backend of the graph being built: 'cpu' or 'gpu'


class Op:
    """Base class of augmentation ops (see the module docstring for the two faces)."""

    reads: Tuple[str, ...] = ()  # plan fields of each view this op reads
    num_outputs: int = 1  # > 1: the op ends a recipe and returns a list
    commutes_with_flip: bool = False  # f(flip(x)) == flip(f(x)) (per-pixel or mirror-symmetric ops)

    def dali(self, x, f, ctx: ViewContext):
        raise NotImplementedError

    def feed(self, name: str, a):
        """Field ``name`` of one view (B, ...) as it enters the DALI graph, prepared on the host
        (default: unchanged); keeps bookkeeping arithmetic out of the graph's CPU side."""
        return a

    def torch(self, x, f, ctx: ViewContext):
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


def is_ragged(x) -> bool:
    """A list of per-image views (different sizes), as a crop of unequal boxes leaves them."""
    return isinstance(x, list)


def refuse_ragged(op: Op, x) -> None:
    if is_ragged(x):
        raise ValueError(
            f"{op!r}: its input views have different sizes; a recipe whose boxes differ in size "
            f"needs Resize right after Crop"
        )
