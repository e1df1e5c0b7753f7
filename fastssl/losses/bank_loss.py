"""Invariance Propagation's memory-bank loss, eager, and the loss algebra the fused kernel shares
(fastssl/kernels/bank_loss.py):

    logits = f @ bank.T / temperature                           (B, N)
    lse    = log sum_{j in top-K of the row} exp(logits_j)      (K = 0: the whole bank)
    L_ins  = -log( s_self / sum_bg s_j ),   L_inv = -log( sum_hardpos s_p / (sum_bg s_j - s_self) )

``bank_loss_eager`` is the reference: the whole (B, N) logit matrix in fp32, then
``invp_losses``.  ``combine`` (the two per-row terms from the background log-sum-exp, the
anchor's own logit and its positives' logits) and ``hardest_positives`` are the algebra both
forms use; the fused form computes the log-sum-exp in one streaming pass instead.  Both forms
take the loss's settings by name, as one ``BankLossSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from fastssl.losses.precision import no_autocast


@dataclass(frozen=True)
class BankLossSettings:
    """InvP's loss settings, named as the ``method.*`` keys they come from (``from_method``)."""

    temperature: float  # logits = f . bank / temperature
    background: int  # K: a row's background is its top-K logits (0 or >= N: the whole bank)
    hard_positives: int  # P: the P least similar positives (0: every positive)
    most_similar: bool = False  # the P most similar positives instead (method.hard_mode=most_similar)

    @classmethod
    def from_method(cls, m) -> "BankLossSettings":
        """From the ``method`` config node of an InvP run."""
        return cls(m.temperature, m.background, m.hard_positives, m.hard_mode == "most_similar")


def hardest_positives(
    pos_logits: torch.Tensor, valid: torch.Tensor, p: int, most_similar: bool = False
) -> torch.Tensor:
    """Mask of the ``p`` least similar valid positives per row (all valid ones when p == 0);
    ``most_similar``: the ``p`` most similar instead (the authors' ``--not_hardpos`` ablation).
    Columns are counted one by one: a positive listed twice can be taken twice."""
    if p <= 0 or p >= pos_logits.shape[1]:
        return valid
    if most_similar:
        order = pos_logits.masked_fill(~valid, float("-inf")).topk(p, dim=1, largest=True).indices
    else:
        order = pos_logits.masked_fill(~valid, float("inf")).topk(p, dim=1, largest=False).indices
    keep = torch.zeros_like(valid)
    keep.scatter_(1, order, True)
    return keep & valid


def combine(lse, self_in_lse, self_logit, pos_logits, valid, hard_positives, most_similar=False):
    """InvP's two per-row terms from the background log-sum-exp, the anchor's own logit and its
    positives' logits (see fastssl/methods/invp.py):

        L_ins = -log( s_self / sum_bg s_j ),   L_inv = -log( sum_hardpos s_p / (sum_bg s_j - s_self) )

    The background always holds self: it is added when the top-K did not contain it."""
    lse = torch.where(self_in_lse, lse, torch.logaddexp(lse, self_logit))
    l_ins = lse - self_logit
    use = hardest_positives(pos_logits.detach(), valid, hard_positives, most_similar)
    lse_pos = pos_logits.masked_fill(~use, float("-inf")).logsumexp(1)
    log_denominator = lse + torch.log(-torch.expm1(self_logit - lse))  # log(sum_bg s - s_self)
    l_inv = log_denominator - lse_pos
    return l_ins, torch.where(use.any(1), l_inv, torch.full_like(l_inv, float("nan")))


def invp_losses(
    logits: torch.Tensor,
    index: torch.Tensor,
    pos: torch.Tensor,
    background: int,
    hard_positives: int,
    most_similar: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row L_ins and L_inv (NaN where a row has no positive), from the full logits (B, N).
    A positive listed more than once in a row of ``pos`` counts once per listing."""
    self_logit = logits.gather(1, index[:, None])[:, 0]
    if 0 < background < logits.shape[1]:
        bg, bg_idx = logits.topk(background, dim=1)
        lse, self_in = bg.logsumexp(1), (bg_idx == index[:, None]).any(1)
    else:
        lse, self_in = logits.logsumexp(1), torch.ones_like(index, dtype=torch.bool)
    return combine(lse, self_in, self_logit, logits.gather(1, pos.clamp(min=0)), pos >= 0, hard_positives, most_similar)


@no_autocast
def bank_loss_eager(
    f: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    pos: torch.Tensor,
    settings: BankLossSettings,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference: the whole (B, N) logit matrix in fp32, then ``invp_losses``.

    f (B, D) batch features, bank (N, D), index (B,) each row's own entry, pos (B, C) positive
    entries with -1 padding; returns per-row (L_ins, L_inv)."""
    check_inputs(f, bank, index, pos)
    logits = f.float() @ bank.float().t() / settings.temperature
    return invp_losses(logits, index, pos, settings.background, settings.hard_positives, settings.most_similar)


def check_inputs(f, bank, index, pos):
    if f.ndim != 2 or bank.ndim != 2 or f.shape[1] != bank.shape[1]:
        raise ValueError(
            f"bank loss: f (B, D) and bank (N, D) must share D, got {tuple(f.shape)} and {tuple(bank.shape)}"
        )
    if index.shape != (f.shape[0],) or pos.ndim != 2 or pos.shape[0] != f.shape[0]:
        raise ValueError(
            f"bank loss: index must be (B,) and pos (B, C) for B = {f.shape[0]}, "
            f"got {tuple(index.shape)} and {tuple(pos.shape)}"
        )
