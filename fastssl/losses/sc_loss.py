"""Spatial Contrasting loss, eager (the reference of the fused kernel in fastssl/kernels/sc_loss.py):

L = 1/B * sum_i [ logsumexp_j(-d_ij) + d_ii ],   d_ij = ||f1_i - f2_j||
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.losses.precision import no_autocast


@no_autocast
def sc_loss_eager(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The reference: exact pairwise distances, then cross-entropy over negative distances, in
    fp32 (also under autocast)."""
    logits = -torch.cdist(f1.float(), f2.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return F.cross_entropy(logits, torch.arange(f1.shape[0], device=f1.device))
