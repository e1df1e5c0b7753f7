"""Fused GPU kernels for pairwise-distance losses (installed as ``fastssl.kernels``).

Each kernel file holds the Triton kernel(s), the ``torch.autograd.Function`` that wraps them,
the eager PyTorch twin of the same maths that tests compare against, and ``configs(dtype)``,
the tiles its launchers use: ``sc_loss`` (Spatial Contrasting), ``triplet`` (layer-wise
contrastive) and ``bank_loss`` (Invariance Propagation's memory bank).  ``_common`` holds the
dtype policy and the shared tile loop; ``selfcheck`` the one-time check behind
``loss.impl=auto``; ``compiled`` compiles every configuration for a GPU target on any machine.
Methods pick an implementation with ``loss.impl``.
"""
