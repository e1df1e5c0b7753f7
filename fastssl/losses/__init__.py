"""The losses in plain PyTorch: the eager forms and the loss algebra, importing no Triton.

One file per loss family: ``sc_loss`` (Spatial Contrasting), ``triplet`` (layer-wise
contrastive: hardest-negative and semi-hard mining) and ``bank_loss`` (Invariance Propagation's
memory bank); ``precision`` holds the dtype policy every loss follows (``no_autocast``,
``loss_input``).  The fused Triton kernels of the same maths live in ``fastssl.kernels`` (same
file names), which imports from here; nothing here imports them.  A method imports a kernel only
when ``loss.impl`` resolves to ``fused`` (docs/architecture.md), so a run with ``loss.impl=eager``
never imports Triton.
"""
