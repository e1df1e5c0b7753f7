"""A memory bank: one L2-normalised feature per training image, updated by an exponential moving
average of the features the network gives the image each time it is visited (InstDisc, InvP).

    bank[i] <- normalize(m * bank[i] + (1 - m) * f_i)          for every i in the step's batch

Use: ``stash(features, index)`` in ``forward`` (detached), ``step(skipped)`` after the optimiser
step (``update`` with the stashed batch; nothing changes when the step was skipped).  Under DDP the update uses every rank's batch
(all-gathered, in rank order), so each rank applies the same writes and the banks stay equal
without a broadcast; ``check_agreement`` verifies that (a fingerprint compared across ranks,
``fastssl.dist.same_on_all_ranks``).

Where the tensor lives, and why.  A method's checkpoints, the tests and the DDP wrapper know the
bank by its state-dict / buffer name: InvP's module has the buffer ``bank`` at its top level
(``load(...)["model"]["bank"]``), and ``ddp_keep_local = ("bank", "graph")`` names it for DDP
to leave out of its per-step broadcast (``fastssl.dist.wrap_ddp``).  A ``MemoryBank``
that held the tensor itself as a submodule ``memory`` would rename it ``memory.bank``: old
checkpoints would no longer load and the DDP exclusion would silently miss it.  So the buffer is
registered on a *host* module under a name of its choosing (``MemoryBank(..., host=method,
name="bank")``): the keys, their order and the buffer's identity are exactly those of the inline
code, ``method.bank`` is the tensor, and ``.to()`` / ``load_state_dict`` act on it as on any of
the host's buffers.  The ``MemoryBank`` keeps no state of its own in the state dict and reads the
tensor from the host at each use (so it follows the host's device moves).  Without a host it
registers the buffer on itself, as an ordinary standalone module (key ``<prefix>bank``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastssl.dist import same_on_all_ranks

__all__ = ["MemoryBank", "all_gather_batch", "initial_bank"]


def initial_bank(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) random unit rows from their own CPU generator seeded ``seed`` (the global torch RNG
    is not touched, so model initialisation does not depend on the bank's size)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


def all_gather_batch(features: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, index), concatenated in rank order; unchanged on one process.
    (Every rank must pass tensors of the same shape: the loaders give every rank whole batches.)"""
    if dist.is_initialized() and dist.get_world_size() > 1:
        fs = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        ids = [torch.empty_like(index) for _ in range(dist.get_world_size())]
        dist.all_gather(fs, features)
        dist.all_gather(ids, index)
        return torch.cat(fs), torch.cat(ids)
    return features, index


class MemoryBank(nn.Module):
    """``n`` L2-normalised ``dim``-wide features, EMA-updated with momentum ``momentum``.

    ``host``/``name``: the module that registers the buffer, and its name there (default: this
    module, ``"bank"``); see the module docstring for why a method passes itself."""

    def __init__(
        self, n: int, dim: int, momentum: float, seed: int, host: Optional[nn.Module] = None, name: str = "bank"
    ):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"memory bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.buffer_name = name
        owner = self if host is None else host
        owner.register_buffer(name, initial_bank(n, dim, seed))
        # a tuple, not an attribute nn.Module would register: the host must not become a child of
        # this module (host -> memory -> host would make state_dict() recurse forever)
        self._owner = (owner,)
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def tensor(self) -> torch.Tensor:
        """The (n, dim) bank (the registered buffer itself, not a copy)."""
        return getattr(self._owner[0], self.buffer_name)

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def pending(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The (features, index) stashed by the last ``stash`` and not yet consumed by ``step``."""
        return self._pending

    def stash(self, features: torch.Tensor, index: torch.Tensor) -> None:
        """Keep this step's (detached) features and their bank rows for ``step``; a later stash
        replaces it (a skipped step's batch never reaches the bank)."""
        self._pending = (features.detach(), index)

    @torch.no_grad()
    def update(self, features: torch.Tensor, index: torch.Tensor, skipped: Optional[torch.Tensor] = None) -> None:
        """``bank[idx] = normalize(m * bank[idx] + (1 - m) * f)`` with every rank's batch.
        A row repeated in the batch gets one of its writes (index assignment: the last one on the
        CPU; CUDA does not promise which), each computed from the bank before the update.
        ``skipped`` (a 0-d bool on the bank's device): write the rows back as they were (a
        skipped training step), decided on the device without a host read."""
        f, idx = all_gather_batch(features, index)
        bank, mom = self.tensor, self.momentum
        old = bank[idx]
        new = F.normalize(mom * old + (1 - mom) * f, dim=1)
        bank[idx] = new if skipped is None else torch.where(skipped, old, new)

    def step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """``update`` with the stashed batch, and clear it."""
        if self._pending is None:
            raise RuntimeError("MemoryBank.step: nothing stashed since the last step (call stash in forward)")
        f, idx = self._pending
        self._pending = None
        self.update(f, idx, skipped)

    def check_agreement(self, *extra: torch.Tensor) -> bool:
        """Whether every rank holds the bit-identical bank (and ``extra`` tensors, e.g. a kNN graph
        built from it); True on one process.  A collective: every rank must call it."""
        bank = self.tensor
        return same_on_all_ranks([bank, *extra], bank.device)

    def extra_repr(self) -> str:
        n, dim = self.tensor.shape
        return f"n={n}, dim={dim}, momentum={self.momentum}, buffer={self.buffer_name!r}"
