"""Shared training machinery: distributed set-up, precision and optimisers, checkpoints,
signals and metrics.  Every method uses these; none copies them."""
