"""Fused GPU kernels for pairwise-distance losses (installed as ``fastssl.kernels``).

Each kernel file holds the Triton kernel(s), the ``torch.autograd.Function`` that wraps them and
``configs(dtype)``, the tiles its launchers use: ``sc_loss`` (Spatial Contrasting), ``triplet``
(layer-wise contrastive) and ``bank_loss`` (Invariance Propagation's memory bank).  The eager
twin of the same maths, which tests compare against, is the file of the same name in
``fastssl.losses`` (plain torch), whose loss algebra the kernels share.  ``_common`` holds the
dtype policy and the shared tile loop; ``runtime`` where the kernels can run (no Triton import);
``selfcheck`` the one-time check behind ``loss.impl=auto``; ``compiled`` compiles every
configuration for a GPU target on any machine.  Methods pick an implementation with
``loss.impl`` and import a kernel only when it resolves to ``fused`` (docs/architecture.md).
"""
