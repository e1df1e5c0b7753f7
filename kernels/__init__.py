"""Fused GPU kernels for pairwise-distance losses (installed as ``fastssl.kernels``).

Each kernel file holds the Triton kernel(s), the ``torch.autograd.Function`` that wraps them
and the eager PyTorch twin of the same maths that tests compare against: ``sc_loss`` (Spatial
Contrasting), ``triplet`` (layer-wise contrastive) and ``bank_loss`` (Invariance
Propagation's memory bank).  Methods pick one with ``loss.impl``.
"""
