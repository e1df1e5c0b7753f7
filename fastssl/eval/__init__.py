"""Evaluation protocols on frozen or fine-tuned backbones: ``python -m fastssl.eval``."""
