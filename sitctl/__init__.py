"""sitctl: train, sample and evaluate SiT (Scalable Interpolant Transformers)."""

__version__ = "0.1.0"
