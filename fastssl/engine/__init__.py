"""Shared training machinery: precision and optimisers, checkpoints, signals, metrics and
monitors (the process group is ``fastssl/dist.py``).  Every method uses these; none copies them."""
