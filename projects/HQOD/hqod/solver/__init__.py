"""Optimizers for the LazyConfigs beyond torch.optim's, and the training schedules by name
(:mod:`hqod.solver.schedules`, which registers the ``${hqod_schedule:...}`` resolver)."""
from . import schedules  # noqa: F401
from .clipping import ClippedSGD

__all__ = ["ClippedSGD"]
