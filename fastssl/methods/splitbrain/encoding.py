"""Split-Brain's grid313 targets in the loss: the soft encoding of ab over the 313 in-gamut
centres (``fastssl.data.lab.GRID313``) and the class-rebalancing prior, as the colourisation code
of Zhang, Isola & Efros has them (github.com/richzhang/colorization).  The pipeline hands the
method the block-mean a and b of every target cell (``ColorSplit`` with ``ab_bins=grid313``);
these run on the training device."""

from __future__ import annotations

import torch

SOFT_NEIGHBOURS, SOFT_SIGMA = 10, 5.0  # NNEncLayer: self.NN = 10., self.sigma = 5.
PRIOR_LAMBDA, PRIOR_ALPHA = 0.5, 1.0  # PriorBoostLayer: self.gamma = .5 (the paper's lambda), self.alpha = 1.
NONGRAY_THRESHOLD = 5.0  # NonGrayMaskLayer: self.thresh = 5

# The colourisation code's training layers (github.com/richzhang/colorization,
# resources/caffe_traininglayers.py; wired in models/colorization_train_val_v2.prototxt):
#   NNEncode      each target ab -> its 10 nearest of the 313 centres, Gaussian weights
#                 exp(-d^2 / (2 sigma^2)), sigma 5, normalised to sum 1 (the soft target);
#   PriorFactor   w = ((1 - lambda) p + lambda u) ** -alpha, lambda 0.5, alpha 1, u uniform over the
#                 bins of p > 0, renormalised so that sum(p * w) = 1 (expected weight 1);
#   PriorBoost    a cell's weight is w of the argmax of its soft target (its nearest bin),
#   NonGrayMask   times 0 for an image with no |a| or |b| above 5 (a grey image);
#   ClassRebalanceMult  the weight scales the gradient of that cell's softmax cross-entropy.


def soft_encode(ab: torch.Tensor, centres: torch.Tensor, k: int = SOFT_NEIGHBOURS, sigma: float = SOFT_SIGMA):
    """(N, 2) ab -> (weights (N, k), bin indices (N, k)): the ``k`` nearest ``centres`` (Q, 2) of
    each point, nearest first, with normalised Gaussian weights of their distance (NNEncode).  The
    dense soft target is ``zeros(N, Q).scatter_(1, index, weights)``.  Squared distances are
    taken per channel ((a - a_j)^2 + (b - b_j)^2: two (N, Q) temporaries) and shifted by the
    nearest one before the exponential (the same weights after normalising, no underflow)."""
    c = centres.to(ab.dtype)
    d2 = (ab[:, :1] - c[:, 0]).square() + (ab[:, 1:] - c[:, 1]).square()
    d2k, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    w = torch.exp(-(d2k - d2k[:, :1]) / (2 * sigma**2))
    return w / w.sum(1, keepdim=True), idx


def prior_factor(prior: torch.Tensor, lam: float = PRIOR_LAMBDA, alpha: float = PRIOR_ALPHA) -> torch.Tensor:
    """Class-rebalancing weight per bin from the prior ``p`` (Q,) (PriorFactor).  A bin of prior 0
    (never seen; their prior has none, and their formula gives it an infinite weight and NaN
    normalisation) gets the weight of the limit p -> 0, ``(lambda u) ** -alpha``."""
    p = prior.double() / prior.double().sum()
    seen = p > 0
    uni = seen.double() / seen.sum()
    mix = (1 - lam) * p + lam * uni
    w = torch.where(seen, mix, lam / seen.sum().double()) ** -alpha
    return w / (p * w).sum()


def nongray_mask(ab: torch.Tensor, thresh: float = NONGRAY_THRESHOLD) -> torch.Tensor:
    """(B, 2, h, w) ab -> (B,) 1.0 where an image has some |a| or |b| above ``thresh`` (NonGrayMask)."""
    return (ab.abs() > thresh).flatten(1).any(1).to(ab.dtype)


def empirical_prior(ab_batches, centres: torch.Tensor, k: int = SOFT_NEIGHBOURS, sigma: float = SOFT_SIGMA):
    """The prior p (Q,) float64 of ab points (an iterable of (N, 2) tensors): the mean of their
    soft encodings, i.e. the empirical ab distribution smoothed with the Gaussian kernel of
    sigma 5 (the paper's p~, Sec. 2.2; their prior file holds ImageNet's and is not shipped here)."""
    total = torch.zeros(len(centres), dtype=torch.float64)
    n = 0
    for ab in ab_batches:
        w, idx = soft_encode(ab.float(), centres)
        w = w.double()  # renormalised in float64: each point's weights then sum to 1 within 1e-15, not float32's 1e-7
        total.index_add_(0, idx.reshape(-1).cpu(), (w / w.sum(1, keepdim=True)).reshape(-1).cpu())
        n += len(ab)
    return total / max(n, 1)
