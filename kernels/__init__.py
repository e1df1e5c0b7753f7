"""Fused GPU kernels for pairwise-distance losses (installed as ``fastssl.kernels``).

Each kernel file holds the Triton kernel(s), the ``torch.autograd.Function`` that wraps them
and the eager PyTorch twin of the same maths that tests compare against.  The methods'
eager losses live in their own modules (e.g. ``fastssl.methods.sc``) until a fused version
exists here.
"""
