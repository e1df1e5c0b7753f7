"""fastssl: self-supervised image-representation training with a GPU data pipeline."""

__version__ = "0.1.0"
