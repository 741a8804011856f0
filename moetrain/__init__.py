"""moetrain: distributed expert-parallel Mixture-of-Experts training on PyTorch."""
__version__ = "0.1.0"
