"""Optimizers for the LazyConfigs beyond torch.optim's."""
from .clipping import ClippedSGD

__all__ = ["ClippedSGD"]
