"""Projection heads: the small networks between a backbone's pooled features and the embedding a
self-supervised loss sees (in the style of Lightly's ``lightly.models.modules.heads``).

Each head *is* the torch layer (or ``nn.Sequential``) a method used to build inline, subclassed
only for a name and a docstring, so that

* its state-dict keys are unchanged (``head.weight`` / ``head.bias`` for ``linear``;
  ``head.0.*`` and ``head.2.*`` for ``mlp``): existing checkpoints load as before;
* its parameters are created in the same order with the same default initialisation, so the
  same torch RNG state gives bit-identical initial weights.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch.nn as nn

from fastssl.errors import choice

Head = Literal["linear", "mlp"]  # a config field's type (method.head)
HEADS = get_args(Head)

__all__ = ["HEADS", "LinearHead", "MLPHead", "projection_head"]


class LinearHead(nn.Linear):
    """One linear map ``in_dim -> out_dim`` (InstDisc's and InvP's default head)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__(in_dim, out_dim, bias=bias)


class MLPHead(nn.Sequential):
    """Linear ``in_dim -> hidden_dim``, ReLU, linear ``hidden_dim -> out_dim`` (SimCLR's head);
    ``hidden_dim`` defaults to ``in_dim``.  Children are indexed 0, 1, 2 like the plain
    ``nn.Sequential`` it replaces."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None):
        hidden = in_dim if hidden_dim is None else hidden_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def projection_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projection head ``kind`` (one of ``HEADS``) from ``in_dim`` features to ``out_dim``."""
    choice(kind, "projection head", HEADS)
    return LinearHead(in_dim, out_dim) if kind == "linear" else MLPHead(in_dim, out_dim)
